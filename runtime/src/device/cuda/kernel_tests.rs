//! GPU tests of the CUDA backend's kernels: NVRTC, the LoRA merge, the cuBLAS product.
//!
//! Like the other GPU tests they construct a [`CudaDevice`] explicitly and
//! fail, never skip, when it cannot be made, and they are ignored by
//! default. Run them with `cargo test -p offload-runtime gpu_ -- --ignored`
//! (or through `scripts/gpu-check`). They print what was loaded and how
//! fast it ran (`--nocapture` shows it).

use std::num::NonZeroUsize;
use std::time::Instant;

use half::{bf16, f16};
use offload_kernels::{Adapter, Delta, Dtype, Factor, KronFactor, MergeSpec};

use super::cublas::GemmAccumulate;
use super::nvrtc::{self, NvrtcError, Target};
use super::*;
use crate::device::{DeviceExt, MergeAdapter, MergeDelta, MergeFactor, MergeKron, MergeOp};

fn gpu() -> CudaDevice {
    CudaDevice::new(0).expect("this test needs a CUDA GPU and CudaDevice::new(0) failed")
}

/// Device buffers for a test: one mapped range per buffer in VMM mode, one
/// contiguous allocation per buffer in fallback mode. Everything is given
/// back on drop.
struct Bufs<'a> {
    d: &'a CudaDevice,
    ranges: Vec<(VirtualRange, Vec<PhysPage>)>,
    blocks: Vec<DevicePtr>,
}

impl<'a> Bufs<'a> {
    fn new(d: &'a CudaDevice) -> Self {
        Bufs {
            d,
            ranges: Vec::new(),
            blocks: Vec::new(),
        }
    }

    fn alloc(&mut self, len: usize) -> DevicePtr {
        let ps = self.d.info().page_size;
        let n = len.div_ceil(ps).max(1);
        if !self.d.maps_pages() {
            let p = self.d.alloc_contiguous(n * ps).unwrap();
            self.blocks.push(p);
            return p;
        }
        let range = self.d.reserve(n * ps).unwrap();
        let pages: Vec<PhysPage> = (0..n).map(|_| self.d.alloc_page().unwrap()).collect();
        for (i, p) in pages.iter().enumerate() {
            self.d.map(range.base.offset(i * ps), *p).unwrap();
        }
        self.ranges.push((range, pages));
        range.base
    }

    fn upload(&mut self, data: &[u8], s: StreamId) -> DevicePtr {
        let p = self.alloc(data.len());
        self.d.write_blocking(p, data, s).unwrap();
        p
    }
}

impl Drop for Bufs<'_> {
    fn drop(&mut self) {
        let _ = self.d.bind().and_then(|()| result::ctx_synchronize());
        let ps = self.d.info().page_size;
        for (range, pages) in self.ranges.drain(..) {
            for i in 0..pages.len() {
                let _ = self.d.unmap(range.base.offset(i * ps));
            }
            let _ = self.d.release(range);
            for p in pages {
                let _ = self.d.free_page(p);
            }
        }
        for p in self.blocks.drain(..) {
            let _ = self.d.free_contiguous(p);
        }
    }
}

/// xorshift64*: uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn decode(dtype: Dtype, b: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
    }
}

/// The kernels' tests' relative tolerance of the f32 accumulation.
const TOL: f64 = 1e-5;

/// Check a merged weight element by element: rows outside `rows`
/// unchanged from `w_bytes`; inside, the GPU's value within one ulp plus
/// `TOL` × bound of the f64 `exact` value, never NaN, and within twice that
/// of the CPU merge. Returns how many elements equal the CPU's bit for bit.
fn check_merged(
    dtype: Dtype,
    (out, cols): (usize, usize),
    rows: &std::ops::Range<usize>,
    w_bytes: &[u8],
    (gpu, cpu): (&[u8], &[u8]),
    (exact, bound): (&[f64], &[f64]),
) -> usize {
    let size = dtype.size_in_bytes();
    let (g, c) = (decode(dtype, gpu), decode(dtype, cpu));
    let mut same = 0;
    for at in 0..out * cols {
        let i = at / cols;
        let span = at * size..(at + 1) * size;
        if !rows.contains(&i) {
            assert_eq!(
                gpu[span.clone()],
                w_bytes[span],
                "[{i}, {}] outside the row slice changed",
                at % cols
            );
            continue;
        }
        let allowed = ulp(dtype, exact[at]) + TOL * bound[at];
        let err = (g[at] - exact[at]).abs();
        assert!(
            !g[at].is_nan() && err <= allowed,
            "{} [{i}, {}]: GPU {:e}, exact {:e}, error {err:e} > allowed {allowed:e}",
            dtype,
            at % cols,
            g[at],
            exact[at]
        );
        let cpu_err = (g[at] - c[at]).abs();
        assert!(
            cpu_err <= 2.0 * allowed,
            "{} [{i}, {}]: GPU {:e}, CPU {:e}: apart by {cpu_err:e} > {:e}",
            dtype,
            at % cols,
            g[at],
            c[at],
            2.0 * allowed
        );
        if gpu[span.clone()] == cpu[span] {
            same += 1;
        }
    }
    same
}

/// One unit in the last place of `dtype` at the magnitude of `x` (zero for
/// f32), as in offload-kernels' tests.
fn ulp(dtype: Dtype, x: f64) -> f64 {
    let (mantissa_bits, min_exp) = match dtype {
        Dtype::F32 => return 0.0,
        Dtype::F16 => (10, -14),
        Dtype::BF16 => (7, -126),
    };
    let exp = if x == 0.0 || !x.is_finite() {
        min_exp
    } else {
        (((x.to_bits() >> 52) & 0x7ff) as i32 - 1023).max(min_exp)
    };
    2f64.powi(exp - mantissa_bits)
}

/// A low-rank adapter's host data: (scale, up bytes, up dtype, down bytes, down dtype, rank).
struct HostAdapter {
    scale: f32,
    up: Vec<u8>,
    up_dtype: Dtype,
    down: Vec<u8>,
    down_dtype: Dtype,
    rank: usize,
}

/// One merge case: W's dtype and shape, the row slice, and (rank, up dtype, down dtype, scale) per adapter.
#[derive(Clone, Debug)]
struct MergeCase {
    dtype: Dtype,
    shape: Vec<usize>,
    rows: Option<std::ops::Range<usize>>,
    adapters: Vec<(usize, Dtype, Dtype, f32)>,
}

/// A merge case's random host data: W's bytes and each adapter's factors.
struct CaseData {
    w: Vec<u8>,
    adapters: Vec<HostAdapter>,
}

impl CaseData {
    fn new(case: &MergeCase, seed: u64) -> CaseData {
        let mut rng = Rng(seed | 1);
        let out = case.shape[0];
        let cols: usize = case.shape[1..].iter().product();
        let n = case.rows.clone().unwrap_or(0..out).len();
        let w = encode(case.dtype, &rng.values(out * cols));
        let adapters = case
            .adapters
            .iter()
            .map(|&(rank, up_dtype, down_dtype, scale)| HostAdapter {
                scale,
                up: encode(up_dtype, &rng.values(n * rank)),
                up_dtype,
                down: encode(down_dtype, &rng.values(rank * cols)),
                down_dtype,
                rank,
            })
            .collect();
        CaseData { w, adapters }
    }

    /// W and each adapter's (up, down) factors copied to the device.
    fn upload(&self, bufs: &mut Bufs<'_>, s: StreamId) -> (DevicePtr, Vec<(DevicePtr, DevicePtr)>) {
        let w = bufs.upload(&self.w, s);
        let factors = self
            .adapters
            .iter()
            .map(|a| (bufs.upload(&a.up, s), bufs.upload(&a.down, s)))
            .collect();
        (w, factors)
    }

    /// The kernels' view of the adapters.
    fn adapters(&self, case: &MergeCase) -> Vec<Adapter<'_>> {
        let cols: usize = case.shape[1..].iter().product();
        let n = case.rows.clone().unwrap_or(0..case.shape[0]).len();
        self.adapters
            .iter()
            .map(|a| Adapter {
                scale: a.scale,
                delta: Delta::LowRank {
                    up: Factor::new(&a.up, a.up_dtype, n, a.rank),
                    down: Factor::new(&a.down, a.down_dtype, a.rank, cols),
                },
            })
            .collect()
    }

    /// The f64 reference of the merged W and its tolerance bound.
    fn reference(&self, case: &MergeCase) -> (Vec<f64>, Vec<f64>) {
        let cols: usize = case.shape[1..].iter().product();
        let rows = case.rows.clone().unwrap_or(0..case.shape[0]);
        let mut exact = decode(case.dtype, &self.w);
        let mut bound: Vec<f64> = exact.iter().map(|v| v.abs()).collect();
        for a in &self.adapters {
            let up = decode(a.up_dtype, &a.up);
            let down = decode(a.down_dtype, &a.down);
            let sc = f64::from(a.scale);
            for i in 0..rows.len() {
                for j in 0..cols {
                    let (mut sum, mut mag) = (0f64, 0f64);
                    for k in 0..a.rank {
                        let p = up[i * a.rank + k] * down[k * cols + j];
                        sum += p;
                        mag += p.abs();
                    }
                    let at = (rows.start + i) * cols + j;
                    exact[at] += sc * sum;
                    bound[at] += sc.abs() * mag;
                }
            }
        }
        (exact, bound)
    }

    /// Checks `gpu` (W merged on the GPU) against the CPU merge and the f64
    /// reference; returns how many elements are bit-identical to the CPU's.
    fn check(&self, case: &MergeCase, gpu: &[u8]) -> usize {
        let adapters = self.adapters(case);
        let spec = MergeSpec::new(case.dtype, &case.shape, case.rows.clone(), &adapters).unwrap();
        let mut cpu = self.w.clone();
        offload_kernels::merge_cpu(&mut cpu, &spec, NonZeroUsize::new(2)).unwrap();
        let (exact, bound) = self.reference(case);
        let out = case.shape[0];
        let cols: usize = case.shape[1..].iter().product();
        check_merged(
            case.dtype,
            (out, cols),
            &case.rows.clone().unwrap_or(0..out),
            &self.w,
            (gpu, &cpu),
            (&exact, &bound),
        )
    }
}

/// Runs one merge on the GPU and on the CPU and checks both against the f64
/// reference with the kernels' tolerance; returns (elements of the row
/// slice, how many of them are bit-identical to the CPU's, whether the GPU
/// ran it on the tensor cores).
fn check_merge(d: &CudaDevice, s: StreamId, case: &MergeCase, seed: u64) -> (usize, usize, bool) {
    let (elements, same) = check_merge_with(d, s, case, seed, LowRankKernel::Auto);
    let data = CaseData::new(case, seed);
    let adapters = data.adapters(case);
    let spec = MergeSpec::new(case.dtype, &case.shape, case.rows.clone(), &adapters).unwrap();
    (elements, same, d.merge_uses_tensor_cores(&spec))
}

/// [`check_merge`] on the kernel `kernel` names: (elements of the row
/// slice, how many of them are bit-identical to the CPU's).
fn check_merge_with(
    d: &CudaDevice,
    s: StreamId,
    case: &MergeCase,
    seed: u64,
    kernel: LowRankKernel,
) -> (usize, usize) {
    let data = CaseData::new(case, seed);
    let adapters = data.adapters(case);
    let spec = MergeSpec::new(case.dtype, &case.shape, case.rows.clone(), &adapters).unwrap();
    let mut bufs = Bufs::new(d);
    let (w, factors) = data.upload(&mut bufs, s);
    d.merge_lowrank_with(&spec, w, &factors, s, kernel).unwrap();
    let mut gpu = vec![0u8; data.w.len()];
    d.read_blocking(w, &mut gpu, s).unwrap();
    let same = data.check(case, &gpu);
    (spec.delta_rows() * spec.cols(), same)
}

/// The launches `after` counts beyond `before`: (one-tensor launches on
/// `kernel`, batched launches on it, launches on any other kernel); `None`
/// for [`LowRankKernel::Auto`], which names no one kernel.
fn launches_on(
    kernel: LowRankKernel,
    before: MergeLaunches,
    after: MergeLaunches,
) -> Option<(u64, u64, u64)> {
    let diff = [
        after.fma - before.fma,
        after.tensor_cores - before.tensor_cores,
        after.pipelined - before.pipelined,
        after.fma_batched - before.fma_batched,
        after.tensor_cores_batched - before.tensor_cores_batched,
        after.pipelined_batched - before.pipelined_batched,
        after.general - before.general,
        after.streaming - before.streaming,
        // The streaming kernels' batched launches: they have none.
        0,
    ];
    let (single, batched) = match kernel {
        LowRankKernel::Fma => (0, 3),
        LowRankKernel::TensorCores => (1, 4),
        LowRankKernel::Pipelined => (2, 5),
        LowRankKernel::Streaming => (7, 8),
        LowRankKernel::Auto => return None,
    };
    let total: u64 = diff.iter().sum();
    Some((
        diff[single],
        diff[batched],
        total - diff[single] - diff[batched],
    ))
}

/// Runs `cases` twice on the GPU with `kernel`: one
/// [`CudaDevice::merge_lowrank_with`] launch per case, and one
/// [`CudaDevice::merge_lowrank_batch`] call for all of them; the batched
/// result must equal the per-case one bit for bit (each element is
/// computed by the same code, in the same order: the batched kernels run
/// the one-tensor body, with the job's own block numbering) and pass the
/// kernels' tolerance against the f64 reference and the CPU. Returns (the
/// launches the batched call queued, elements, elements bit-identical to
/// the CPU's).
fn check_batch(
    d: &CudaDevice,
    s: StreamId,
    cases: &[MergeCase],
    kernel: LowRankKernel,
    seed: u64,
) -> (usize, usize, usize) {
    let data: Vec<CaseData> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| CaseData::new(c, seed + i as u64))
        .collect();
    let adapters: Vec<Vec<Adapter<'_>>> =
        data.iter().zip(cases).map(|(x, c)| x.adapters(c)).collect();
    let specs: Vec<MergeSpec<'_>> = cases
        .iter()
        .zip(&adapters)
        .map(|(c, a)| MergeSpec::new(c.dtype, &c.shape, c.rows.clone(), a).unwrap())
        .collect();
    let mut bufs = Bufs::new(d);
    let one: Vec<DevicePtr> = data.iter().map(|x| bufs.upload(&x.w, s)).collect();
    let batched: Vec<DevicePtr> = data.iter().map(|x| bufs.upload(&x.w, s)).collect();
    let factors: Vec<Vec<(DevicePtr, DevicePtr)>> = data
        .iter()
        .map(|x| {
            x.adapters
                .iter()
                .map(|a| (bufs.upload(&a.up, s), bufs.upload(&a.down, s)))
                .collect()
        })
        .collect();
    for i in 0..cases.len() {
        d.merge_lowrank_with(&specs[i], one[i], &factors[i], s, kernel)
            .unwrap();
    }
    let merges: Vec<LowRankMerge<'_, '_>> = (0..cases.len())
        .map(|i| LowRankMerge {
            spec: &specs[i],
            w: batched[i],
            factors: &factors[i],
        })
        .collect();
    let before = d.merge_launches();
    let launches = d.merge_lowrank_batch(&merges, s, kernel).unwrap();
    if let Some((single, batched, other)) = launches_on(kernel, before, d.merge_launches()) {
        assert!(
            batched >= 1 && other == 0 && (single + batched) as usize == launches,
            "{kernel:?}: {launches} launches, of which {batched} batched and {single} one-tensor on that kernel, {other} on others"
        );
    }
    let (mut elements, mut same) = (0, 0);
    for (i, case) in cases.iter().enumerate() {
        let mut a = vec![0u8; data[i].w.len()];
        let mut b = vec![0u8; data[i].w.len()];
        d.read_blocking(one[i], &mut a, s).unwrap();
        d.read_blocking(batched[i], &mut b, s).unwrap();
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(
            differ == 0,
            "{kernel:?} {} {:?} rows {:?}: {differ} bytes of the batched merge differ from its own launch",
            case.dtype,
            case.shape,
            case.rows
        );
        same += data[i].check(case, &b);
        elements += specs[i].delta_rows() * specs[i].cols();
    }
    (launches, elements, same)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_nvrtc_builds_the_merge_kernels_for_the_device() {
    let d = gpu();
    let cc = d.info().compute_capability.unwrap();
    eprintln!(
        "NVRTC library names tried: {:?}",
        nvrtc::library_candidates()
    );
    eprintln!(
        "NVRTC version {:?}, supported archs {:?}",
        nvrtc::version(),
        nvrtc::supported_archs()
    );
    let t = Instant::now();
    let info = d.prepare_merge().expect("building the merge kernels");
    eprintln!(
        "merge kernels for {} ({cc:?}): {} with NVRTC {:?} in {:?} (first call {:?}, disk cache {:?}), options {:?}, library {:?}, log {:?}",
        d.info().name,
        info.target,
        info.nvrtc_version,
        info.build_time,
        t.elapsed(),
        info.disk_cache,
        info.options,
        info.library,
        info.log
    );
    assert!(
        info.library.is_some(),
        "no libnvrtc mapped in the process after compiling"
    );
    let arch = cc.0 * 10 + cc.1;
    assert!(
        info.target == Target::Cubin(arch) || matches!(info.target, Target::Ptx(a) if a < arch),
        "{:?}",
        info.target
    );
    // Cached for the process: the same image again, at no cost.
    let a = nvrtc::compile(
        "lowrank_merge.cu",
        offload_kernels::cuda::LOWRANK_MERGE_SRC,
        cc,
    )
    .unwrap();
    let b = nvrtc::compile(
        "lowrank_merge.cu",
        offload_kernels::cuda::LOWRANK_MERGE_SRC,
        cc,
    )
    .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    // A second device of the same GPU loads the cached image into its context.
    let d2 = gpu();
    let t = Instant::now();
    d2.prepare_merge().unwrap();
    eprintln!("second device: loaded in {:?}", t.elapsed());
    // Through the Device trait: one line that names the target.
    let line = Device::prepare(&d2, KernelFamily::Merge).unwrap().unwrap();
    eprintln!("{line}");
    assert!(
        line.starts_with(&format!("merge kernels for {}: ", info.target)),
        "{line}"
    );
    let line = Device::prepare(&d2, KernelFamily::Matmul).unwrap().unwrap();
    eprintln!("{line}");
    assert!(line.starts_with("matrix products: "), "{line}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_nvrtc_compile_error_carries_the_log() {
    let d = gpu();
    let cc = d.info().compute_capability.unwrap();
    let src = "extern \"C\" __global__ void k(float* p) { p[0] = offload_no_such_function(1); }\n";
    let r = nvrtc::compile("broken.cu", src, cc);
    let Err(NvrtcError::Compile { log, target, .. }) = &r else {
        panic!("expected a compile error, got {r:?}");
    };
    eprintln!("compile error for {target}:\n{log}");
    assert!(log.contains("offload_no_such_function"), "{log}");
    let e: Error = r.unwrap_err().into();
    let msg = e.to_string();
    assert!(
        msg.contains("offload_no_such_function") && msg.contains("broken.cu"),
        "{msg}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_lowrank_matches_cpu_merge() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let mut cases = Vec::new();
    for dtype in Dtype::ALL {
        // A row slice whose length and width are not multiples of the 32 x 128
        // tile; two adapters of mixed factor dtypes whose ranks (5 + 40) take
        // two chunks, the second adapter split across them.
        cases.push(MergeCase {
            dtype,
            shape: vec![150, 200],
            rows: Some(7..137),
            adapters: vec![
                (5, Dtype::F16, Dtype::BF16, 0.7),
                (40, Dtype::F32, Dtype::F32, -1.3),
            ],
        });
        // A 3x3 conv weight, whole, one bf16 adapter.
        cases.push(MergeCase {
            dtype,
            shape: vec![64, 16, 3, 3],
            rows: None,
            adapters: vec![(8, Dtype::BF16, Dtype::BF16, 0.25)],
        });
        // Tall enough that a block walks several 32 x 128 tiles of its
        // column strip (the next tile's W prefetched), with ranks that add
        // up to 32 (A staged once per block).
        if dtype == Dtype::F16 {
            cases.push(MergeCase {
                dtype,
                shape: vec![4096, 640],
                rows: Some(5..4093),
                adapters: vec![
                    (8, Dtype::BF16, Dtype::F16, 0.5),
                    (24, Dtype::F16, Dtype::BF16, -0.7),
                ],
            });
        }
        // The most adapters one launch takes, one row.
        cases.push(MergeCase {
            dtype,
            shape: vec![3, 1000],
            rows: Some(1..2),
            adapters: (0..MAX_ADAPTERS_FOR_TEST)
                .map(|i| (1 + i, Dtype::F16, Dtype::F32, 0.1 * i as f32 - 0.3))
                .collect(),
        });
    }
    for (i, case) in cases.iter().enumerate() {
        let (elements, same, mma) = check_merge(&d, s, case, 0x5eed + i as u64);
        assert!(
            !mma,
            "mixed or f32 factor dtypes, or ranks adding up to 16 or less, take the fp32 FMA kernel"
        );
        eprintln!(
            "merge {} {:?} rows {:?}, {} adapters: {elements} elements, {same} bit-identical to the CPU",
            case.dtype,
            case.shape,
            case.rows,
            case.adapters.len()
        );
    }
    // Throughput of a realistic merge (informative): an SDXL-sized
    // 1280 x 1280 f16 weight, one rank-32 f16 adapter.
    let mut bufs = Bufs::new(&d);
    let (rows, cols, rank) = (1280usize, 1280usize, 32usize);
    let zeros = vec![0u8; rows * cols * 2];
    let w = bufs.upload(&zeros, s);
    let up_b = vec![0u8; rows * rank * 2];
    let down_b = vec![0u8; rank * cols * 2];
    let (up, down) = (bufs.upload(&up_b, s), bufs.upload(&down_b, s));
    let adapters = [Adapter {
        scale: 1.0,
        delta: Delta::LowRank {
            up: Factor::new(&up_b, Dtype::F16, rows, rank),
            down: Factor::new(&down_b, Dtype::F16, rank, cols),
        },
    }];
    let spec = MergeSpec::new(Dtype::F16, &[rows, cols], None, &adapters).unwrap();
    d.merge_lowrank(&spec, w, &[(up, down)], s).unwrap();
    d.stream_synchronize(s).unwrap();
    let reps = 50;
    let t = Instant::now();
    for _ in 0..reps {
        d.merge_lowrank(&spec, w, &[(up, down)], s).unwrap();
    }
    d.stream_synchronize(s).unwrap();
    let per = t.elapsed() / reps;
    eprintln!(
        "merge 1280x1280 f16, rank 32: {per:?} per launch, {:.0} GB/s of W read and written",
        (2 * rows * cols * 2) as f64 / per.as_secs_f64() / 1e9
    );
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

const MAX_ADAPTERS_FOR_TEST: usize = offload_kernels::cuda::MAX_ADAPTERS;

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_lowrank_rejects_bad_operands() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(&d);
    let (rows, cols, rank) = (32usize, 48usize, 4usize);
    let w = bufs.alloc(rows * cols * 4);
    let up = bufs.alloc(rows * rank * 4);
    let down = bufs.alloc(rank * cols * 4);
    let (ub, db) = (vec![0u8; rows * rank * 4], vec![0u8; rank * cols * 4]);
    let adapters = [Adapter {
        scale: 1.0,
        delta: Delta::LowRank {
            up: Factor::new(&ub, Dtype::F32, rows, rank),
            down: Factor::new(&db, Dtype::F32, rank, cols),
        },
    }];
    let spec = MergeSpec::new(Dtype::F32, &[rows, cols], None, &adapters).unwrap();
    d.merge_lowrank(&spec, w, &[(up, down)], s).unwrap();
    // Wrong factor count, unmapped, misaligned, overlapping W.
    assert!(matches!(
        d.merge_lowrank(&spec, w, &[], s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.merge_lowrank(&spec, w, &[(up, DevicePtr(0x10))], s),
        Err(Error::BadAddress { .. })
    ));
    assert!(matches!(
        d.merge_lowrank(&spec, w, &[(up.offset(2), down)], s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.merge_lowrank(&spec, w, &[(w, down)], s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.merge_lowrank(&spec, w, &[(up, down)], StreamId(0xdead_0000)),
        Err(Error::UnknownStream(_))
    ));
    // f32 factors: the fp32 FMA kernel takes them, the tensor cores do not.
    d.merge_lowrank_with(&spec, w, &[(up, down)], s, LowRankKernel::Fma)
        .unwrap();
    let e = d
        .merge_lowrank_with(&spec, w, &[(up, down)], s, LowRankKernel::TensorCores)
        .unwrap_err();
    assert!(
        matches!(&e, Error::Kernel { .. }) && e.to_string().contains("both in bf16"),
        "{e}"
    );
    // LoHa is not a low-rank delta.
    let loha = [Adapter {
        scale: 1.0,
        delta: Delta::LoHa {
            w1a: Factor::new(&ub, Dtype::F32, rows, rank),
            w1b: Factor::new(&db, Dtype::F32, rank, cols),
            w2a: Factor::new(&ub, Dtype::F32, rows, rank),
            w2b: Factor::new(&db, Dtype::F32, rank, cols),
        },
    }];
    let spec = MergeSpec::new(Dtype::F32, &[rows, cols], None, &loha).unwrap();
    assert!(matches!(
        d.merge_lowrank(&spec, w, &[(up, down)], s),
        Err(Error::Kernel { .. })
    ));
    d.stream_synchronize(s).unwrap();
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_lowrank_tensor_cores_match_cpu_merge() {
    let d = gpu();
    let cc = d.info().compute_capability.unwrap();
    let tensor_cores = cc >= offload_kernels::cuda::MMA_MIN_COMPUTE_CAPABILITY;
    let s = d.create_stream().unwrap();
    let mut cases = Vec::new();
    for dtype in Dtype::ALL {
        // Ranks above 32 (not multiples of 16 either), both 16-bit types
        // (one per adapter), a row slice that is not a multiple of the tile.
        cases.push(MergeCase {
            dtype,
            shape: vec![150, 200],
            rows: Some(7..137),
            adapters: vec![
                (64, Dtype::F16, Dtype::F16, 0.7),
                (100, Dtype::BF16, Dtype::BF16, -1.2),
                (5, Dtype::F16, Dtype::F16, 0.3),
            ],
        });
        // A 3x3 conv, one rank-256 adapter.
        cases.push(MergeCase {
            dtype,
            shape: vec![64, 32, 3, 3],
            rows: None,
            adapters: vec![(256, Dtype::BF16, Dtype::BF16, 0.05)],
        });
        // Tall enough that a block walks several tiles of its strip.
        if dtype == Dtype::BF16 {
            cases.push(MergeCase {
                dtype,
                shape: vec![4096, 640],
                rows: None,
                adapters: vec![(40, Dtype::BF16, Dtype::BF16, 0.4)],
            });
        }
        // The most adapters a low-rank launch takes.
        cases.push(MergeCase {
            dtype,
            shape: vec![70, 130],
            rows: Some(3..70),
            adapters: (0..MAX_ADAPTERS_FOR_TEST)
                .map(|i| (33 + 7 * i, Dtype::F16, Dtype::F16, 0.1 * i as f32 - 0.3))
                .collect(),
        });
    }
    for (i, case) in cases.iter().enumerate() {
        let (elements, same, mma) = check_merge(&d, s, case, 0x7e45 + i as u64);
        assert_eq!(mma, tensor_cores, "compute capability {cc:?}");
        eprintln!(
            "merge {} {:?} rows {:?}, {} adapters (tensor cores: {mma}): {elements} elements, {same} bit-identical to the CPU",
            case.dtype,
            case.shape,
            case.rows,
            case.adapters.len()
        );
        // Each tensor-core kernel by name on the same merge (`auto` took
        // the one the device's configuration names): the pipelined one's
        // copy path where the rank and the columns are multiples of 8, plain
        // loads elsewhere.
        if tensor_cores {
            for kernel in [LowRankKernel::TensorCores, LowRankKernel::Pipelined] {
                let (elements, same) = check_merge_with(&d, s, case, 0x7e45 + i as u64, kernel);
                eprintln!("  {kernel:?}: {elements} elements, {same} bit-identical to the CPU");
            }
        }
    }

    d.destroy_stream(s).unwrap();
}

/// Cases every streaming-kernel test runs, for W of `dtype`: one rank-8
/// adapter on a row slice, three mixed-dtype adapters (8 ranks) on a conv
/// weight, and a small W of fewer columns than a strip.
fn streaming_cases(dtype: Dtype) -> Vec<MergeCase> {
    use Dtype::{BF16, F16, F32};
    let case = |shape: &[usize], rows, adapters| MergeCase {
        dtype,
        shape: shape.to_vec(),
        rows,
        adapters,
    };
    vec![
        case(&[150, 512], Some(7..137), vec![(8, F16, F16, 0.7)]),
        case(
            &[64, 16, 3, 3],
            None,
            vec![
                (3, BF16, F32, 0.25),
                (1, F16, F16, 1.0),
                (4, F32, F16, -1.5),
            ],
        ),
        case(&[40, 90], None, vec![(2, F16, F16, -0.8)]),
    ]
}

/// The streaming fp32 FMA kernels (`LowRankKernel::Streaming`) against
/// the CPU merge and the f64 reference, for W in f32, f16 and bf16: ranks
/// adding up to at most 8 and at most 32 (one to four adapters, mixed
/// factor dtypes), row slices, a conv weight, columns
/// that are not whole vectors per lane or whole strips, a W whose rows are
/// not vector-aligned, and a tall weight that many blocks walk; each merge
/// one launch on a streaming kernel. A stack past 32 ranks takes the fp32
/// FMA kernel.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_streaming_kernels_match_the_reference() {
    use Dtype::{BF16, F16, F32};
    let d = gpu();
    let s = d.create_stream().unwrap();
    let mut cases = Vec::new();
    for dtype in Dtype::ALL {
        let case = |shape: &[usize], rows, adapters| MergeCase {
            dtype,
            shape: shape.to_vec(),
            rows,
            adapters,
        };
        cases.extend(streaming_cases(dtype));
        cases.push(case(&[33, 301], None, vec![(32, F16, F16, 0.5)]));
        cases.push(case(
            &[200, 517],
            Some(1..199),
            vec![
                (8, F16, F16, 0.5),
                (8, BF16, BF16, -0.3),
                (9, F32, F32, 0.9),
                (7, F16, BF16, 1.1),
            ],
        ));
        cases.push(case(&[4096, 640], None, vec![(16, F16, F16, 0.4)]));
    }
    let mut elements_all = 0;
    for (i, case) in cases.iter().enumerate() {
        let before = d.merge_launches();
        let (elements, same) =
            check_merge_with(&d, s, case, 0x57e4 + i as u64, LowRankKernel::Streaming);
        let (single, _, others) =
            launches_on(LowRankKernel::Streaming, before, d.merge_launches()).unwrap();
        assert_eq!((single, others), (1, 0), "{case:?}: one streaming launch");
        eprintln!(
            "streaming {} {:?} rows {:?}, ranks {:?}: {elements} elements, {same} bit-identical to the CPU",
            case.dtype,
            case.shape,
            case.rows,
            case.adapters.iter().map(|a| a.0).collect::<Vec<_>>()
        );
        elements_all += elements;
    }
    // Past 32 ranks: the fp32 FMA kernel.
    let big = MergeCase {
        dtype: F16,
        shape: vec![100, 200],
        rows: None,
        adapters: vec![(20, F16, F16, 0.5), (13, F16, F16, 0.5)],
    };
    let before = d.merge_launches();
    check_merge_with(&d, s, &big, 0x57e5, LowRankKernel::Streaming);
    let after = d.merge_launches();
    assert_eq!(
        (after.fma - before.fma, after.streaming - before.streaming),
        (1, 0)
    );
    eprintln!("streaming: {elements_all} elements checked in all");
    d.destroy_stream(s).unwrap();
}

/// W of `data` merged once by `spec` with `kernel` on `d` at `shift` bytes
/// past an allocation's start (0: aligned), on a fresh stream; W's bytes
/// read back and the launches the merge counted (after less before).
fn merged_at_shift(
    d: &CudaDevice,
    data: &CaseData,
    spec: &MergeSpec<'_>,
    shift: usize,
    kernel: LowRankKernel,
) -> (Vec<u8>, MergeLaunches, MergeLaunches) {
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(d);
    let (w0, factors) = data.upload(&mut bufs, s);
    let w = if shift == 0 {
        w0
    } else {
        let mut padded = vec![0u8; shift];
        padded.extend_from_slice(&data.w);
        bufs.upload(&padded, s).offset(shift)
    };
    let before = d.merge_launches();
    d.merge_lowrank_with(spec, w, &factors, s, kernel).unwrap();
    let after = d.merge_launches();
    let mut out = vec![0u8; data.w.len()];
    d.read_blocking(w, &mut out, s).unwrap();
    drop(bufs);
    d.destroy_stream(s).unwrap();
    (out, before, after)
}

/// The ranks-8 streaming kernel with the down factors in shared memory
/// ([`CudaConfig::stream8_shared`]) gives bit for bit what the one with
/// them in registers gives (the same sums in the same order), on every W
/// dtype, row slices, conv weights, mixed factor dtypes, a W that is not a
/// whole number of groups or strips, and W off a 16-byte boundary; each
/// merge is one streaming launch, within the f64 reference's bound. A
/// stack past 8 ranks still takes the ranks-32 kernel.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_stream8_shared_matches_stream8_bit_for_bit() {
    use Dtype::{BF16, F16};
    let regs = gpu();
    let shared = CudaDevice::with_config(
        0,
        &CudaConfig {
            stream8_shared: true,
            ..CudaConfig::default()
        },
    )
    .expect("a CUDA GPU");
    assert!(shared.stream8_shared() && !regs.stream8_shared());
    assert!(shared.memory_mode_note().contains(STREAM8_ENV));
    let mut cases = Vec::new();
    for dtype in Dtype::ALL {
        let case = |shape: &[usize], rows, adapters| MergeCase {
            dtype,
            shape: shape.to_vec(),
            rows,
            adapters,
        };
        cases.extend(streaming_cases(dtype));
        cases.push(case(&[203, 517], Some(1..202), vec![(5, BF16, BF16, -0.3)]));
        cases.push(case(&[1030, 1280], None, vec![(8, F16, F16, 0.4)]));
    }
    for (i, case) in cases.iter().enumerate() {
        let data = CaseData::new(case, 0x58e4 + i as u64);
        let adapters = data.adapters(case);
        let spec = MergeSpec::new(case.dtype, &case.shape, case.rows.clone(), &adapters).unwrap();
        let run = |d: &CudaDevice, shift: usize| -> Vec<u8> {
            let (out, before, after) =
                merged_at_shift(d, &data, &spec, shift, LowRankKernel::Streaming);
            let (single, _, others) = launches_on(LowRankKernel::Streaming, before, after).unwrap();
            assert_eq!((single, others), (1, 0), "case {i}: one streaming launch");
            // On kernel 1c exactly where the device is configured for it.
            assert_eq!(
                after.streaming_shared - before.streaming_shared,
                u64::from(d.stream8_shared()),
                "case {i}: the launch's streaming kernel"
            );
            out
        };
        let shift = if i % 2 == 1 {
            case.dtype.size_in_bytes()
        } else {
            0
        };
        let want = run(&regs, shift);
        let got = run(&shared, shift);
        assert!(
            got == want,
            "case {i} ({case:?}, W shifted {shift} bytes): not bit for bit the registers kernel's"
        );
        let same = data.check(case, &got);
        eprintln!(
            "stream8 shared {} {:?} rows {:?}, W shifted {shift} bytes: bit-identical to stream8; {same} elements bit-identical to the CPU",
            case.dtype, case.shape, case.rows
        );
    }
    // Past 8 ranks: the ranks-32 kernel on both.
    let wide = MergeCase {
        dtype: F16,
        shape: vec![100, 200],
        rows: None,
        adapters: vec![(9, F16, F16, 0.5)],
    };
    let s = shared.create_stream().unwrap();
    check_merge_with(&shared, s, &wide, 0x58e5, LowRankKernel::Streaming);
    shared.destroy_stream(s).unwrap();
}

/// Throughput of the low-rank kernels (informative; `offload bench merge`
/// is the measurement): a 4096 x 4096 f16 weight, one or four adapters with
/// f16 factors, on each kernel, rotating through four copies of W (128 MiB,
/// more than the L2). The TFLOP/s the tensor cores reach.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_lowrank_throughput_of_each_kernel() {
    let d = gpu();
    let cc = d.info().compute_capability.unwrap();
    let tensor_cores = cc >= offload_kernels::cuda::MMA_MIN_COMPUTE_CAPABILITY;
    let s = d.create_stream().unwrap();
    let (rows, cols) = (4096usize, 4096usize);
    let mut bufs = Bufs::new(&d);
    let ws: Vec<DevicePtr> = (0..4)
        .map(|_| {
            let w = bufs.alloc(rows * cols * 2);
            d.launch(
                &Kernel::Fill {
                    dst: w,
                    len: rows * cols * 2,
                    value: 0,
                },
                s,
            )
            .unwrap();
            w
        })
        .collect();
    for rank in [8usize, 16, 32, 64, 128, 256] {
        let up_b = vec![0u8; rows * rank * 2];
        let down_b = vec![0u8; rank * cols * 2];
        let (up, down) = (bufs.upload(&up_b, s), bufs.upload(&down_b, s));
        for count in [1usize, 4] {
            let adapters: Vec<Adapter> = (0..count)
                .map(|_| Adapter {
                    scale: 1.0,
                    delta: Delta::LowRank {
                        up: Factor::new(&up_b, Dtype::F16, rows, rank),
                        down: Factor::new(&down_b, Dtype::F16, rank, cols),
                    },
                })
                .collect();
            let factors = vec![(up, down); count];
            let spec = MergeSpec::new(Dtype::F16, &[rows, cols], None, &adapters).unwrap();
            let auto_kernel = d.auto_lowrank_kernel(&spec);
            let mut line = format!("merge {rows}x{cols} f16, {count} x rank {rank} f16 factors:");
            for kernel in [
                LowRankKernel::Fma,
                LowRankKernel::Streaming,
                LowRankKernel::TensorCores,
                LowRankKernel::Pipelined,
            ] {
                let tensor_kernel = matches!(
                    kernel,
                    LowRankKernel::TensorCores | LowRankKernel::Pipelined
                );
                if tensor_kernel && !tensor_cores
                    || kernel == LowRankKernel::Streaming && rank * count > 32
                {
                    continue;
                }
                for &w in &ws {
                    d.merge_lowrank_with(&spec, w, &factors, s, kernel).unwrap();
                }
                d.stream_synchronize(s).unwrap();
                let reps = 24;
                let t = Instant::now();
                for i in 0..reps {
                    d.merge_lowrank_with(&spec, ws[i % ws.len()], &factors, s, kernel)
                        .unwrap();
                }
                d.stream_synchronize(s).unwrap();
                let per = t.elapsed() / reps as u32;
                let secs = per.as_secs_f64();
                line += &format!(
                    " {}{} {per:?}, {:.1} TFLOP/s, {:.0} GB/s;",
                    match kernel {
                        LowRankKernel::Fma => "fp32 FMA",
                        LowRankKernel::Streaming => "streaming",
                        LowRankKernel::Pipelined => "pipelined",
                        _ => "tensor cores",
                    },
                    if kernel == auto_kernel { " (auto)" } else { "" },
                    (2 * rows * cols * rank * count) as f64 / secs / 1e12,
                    (2 * rows * cols * 2) as f64 / secs / 1e9
                );
            }
            eprintln!("{line}");
        }
    }
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

/// The pipelined tensor-core kernel on 128-row tiles
/// ([`CudaConfig::pipe_tall`]) gives bit for bit what the one on 64-row
/// tiles gives (each element's sums are the same, in the same order), alone
/// and batched, on every W dtype: row slices, a conv weight, stacks up to
/// 4 × rank 128, W and ranks that are not whole tiles or 16-byte rows, and
/// W off a 16-byte boundary; on grids for every SM and for one (each block
/// walking every tile of its strip); every merge within the f64
/// reference's bound, and the launch counts say which tile height ran.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pipe_tall_matches_pipe_bit_for_bit() {
    use Dtype::{BF16, F16};
    let mut cases = Vec::new();
    for dtype in Dtype::ALL {
        let f = if dtype == BF16 { BF16 } else { F16 };
        let case = |shape: &[usize], rows, adapters| MergeCase {
            dtype,
            shape: shape.to_vec(),
            rows,
            adapters,
        };
        cases.push(case(
            &[150, 200],
            Some(7..137),
            vec![(16, f, f, 0.7), (40, f, f, -1.3)],
        ));
        cases.push(case(&[64, 16, 3, 3], None, vec![(24, f, f, 0.25)]));
        cases.push(case(
            &[1280, 640],
            None,
            vec![
                (128, f, f, 0.5),
                (128, f, f, -0.3),
                (128, f, f, 0.2),
                (128, f, f, 0.9),
            ],
        ));
        cases.push(case(&[300, 130], None, vec![(21, f, f, -0.9)]));
        cases.push(case(
            &[257, 1000],
            Some(1..256),
            vec![(32, f, f, 1.1), (8, f, f, 0.4)],
        ));
    }
    let pipe_launches = |d: &CudaDevice| {
        let m = d.merge_launches();
        (m.pipelined + m.pipelined_batched, m.pipelined_tall)
    };
    // Grids for every SM (a block a tile, here), and for one (a block per
    // column strip, walking every tile of it: the pipeline runs across
    // tiles). Both devices configured here, not from the environment.
    for cap in [None, Some(1)] {
        let open = |pipe_tall: bool| {
            CudaDevice::with_config(
                0,
                &CudaConfig {
                    pipe_tall,
                    merge_multiprocessors: cap,
                    ..CudaConfig::default()
                },
            )
            .expect("a CUDA GPU")
        };
        let (short, tall) = (open(false), open(true));
        assert!(tall.pipe_tall() && !short.pipe_tall());
        assert!(tall.memory_mode_note().contains(PIPE_ROWS_ENV));
        for (i, case) in cases.iter().enumerate() {
            let data = CaseData::new(case, 0x7a11 + i as u64);
            let adapters = data.adapters(case);
            let spec =
                MergeSpec::new(case.dtype, &case.shape, case.rows.clone(), &adapters).unwrap();
            let run = |d: &CudaDevice, shift: usize| -> Vec<u8> {
                let (out, before, after) =
                    merged_at_shift(d, &data, &spec, shift, LowRankKernel::Pipelined);
                let (single, batched, others) =
                    launches_on(LowRankKernel::Pipelined, before, after).unwrap();
                assert_eq!(
                    (single, batched, others),
                    (1, 0, 0),
                    "case {i}: one pipelined launch"
                );
                assert_eq!(
                    after.pipelined_tall - before.pipelined_tall,
                    u64::from(d.pipe_tall()),
                    "case {i}: the launch's tile height"
                );
                out
            };
            let shift = if i % 2 == 1 {
                case.dtype.size_in_bytes()
            } else {
                0
            };
            let want = run(&short, shift);
            let got = run(&tall, shift);
            assert!(
                got == want,
                "case {i} ({case:?}, W shifted {shift} bytes, SMs {cap:?}): not bit for bit the 64-row kernel's"
            );
            let same = data.check(case, &got);
            eprintln!(
                "pipelined on 128-row tiles {} {:?} rows {:?}, W shifted {shift} bytes, SMs {cap:?}: bit-identical to 64-row tiles; {same} elements bit-identical to the CPU",
                case.dtype, case.shape, case.rows
            );
        }
        // Batched on 128-row tiles: bit for bit one launch each (on 128-row
        // tiles too), one batched launch a dtype.
        let s = tall.create_stream().unwrap();
        for dtype in Dtype::ALL {
            let of: Vec<MergeCase> = cases.iter().filter(|c| c.dtype == dtype).cloned().collect();
            let (_, tall0) = pipe_launches(&tall);
            let (launches, elements, _) =
                check_batch(&tall, s, &of, LowRankKernel::Pipelined, 0x7a12);
            let (_, tall1) = pipe_launches(&tall);
            assert_eq!(launches, 1, "{dtype}: one batched launch");
            // The one-tensor launches check_batch compares with, and the batch.
            assert_eq!(tall1 - tall0, of.len() as u64 + 1, "{dtype}");
            eprintln!(
                "batched on 128-row tiles {dtype}, SMs {cap:?}: {elements} elements bit-identical to one launch each"
            );
        }
        tall.destroy_stream(s).unwrap();
    }
}

/// Batched low-rank merges equal one launch per tensor bit for bit, on both
/// kernels, for f16, bf16 and f32 weights: tensors of different shapes and
/// row slices in one launch (one tall enough for many blocks, one with the
/// most adapters a job takes), a tensor with more adapters than a job takes
/// (a launch of its own), and more tensors than one launch takes.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_lowrank_batch_matches_one_launch_per_tensor() {
    use offload_kernels::cuda::{BATCH_MAX_ADAPTERS, BATCH_MAX_JOBS};
    use Dtype::{BF16, F16, F32};
    let d = gpu();
    let s = d.create_stream().unwrap();
    let case = |dtype, shape: &[usize], rows, adapters| MergeCase {
        dtype,
        shape: shape.to_vec(),
        rows,
        adapters,
    };
    let mut total = (0, 0);
    let kernels = [
        LowRankKernel::Fma,
        LowRankKernel::TensorCores,
        LowRankKernel::Pipelined,
    ];
    for kernel in kernels {
        for dtype in [F16, BF16, F32] {
            // The tensor cores take one 16-bit type for both factors; fp32
            // FMA any mix.
            let fd = if dtype == BF16 { BF16 } else { F16 };
            let (ud, dd) = match kernel {
                LowRankKernel::Fma => (F16, BF16),
                _ => (fd, fd),
            };
            let cases = vec![
                case(
                    dtype,
                    &[150, 200],
                    Some(7..137),
                    vec![(5, ud, dd, 0.7), (40, fd, fd, -1.3)],
                ),
                case(dtype, &[64, 16, 3, 3], None, vec![(8, ud, dd, 0.25)]),
                // SDXL's ranks, tall: many blocks for this job.
                case(
                    dtype,
                    &[1024, 640],
                    Some(5..1021),
                    vec![(32, fd, fd, 0.5), (64, fd, fd, -0.3)],
                ),
                case(
                    dtype,
                    &[3, 1000],
                    Some(1..2),
                    (0..BATCH_MAX_ADAPTERS)
                        .map(|i| (1 + 3 * i, fd, fd, 0.1 * i as f32 - 0.2))
                        .collect(),
                ),
                // More adapters than a job takes: its own launch.
                case(
                    dtype,
                    &[40, 90],
                    None,
                    (0..BATCH_MAX_ADAPTERS + 2)
                        .map(|i| (2 + i, fd, fd, 0.3 - 0.1 * i as f32))
                        .collect(),
                ),
                case(dtype, &[300, 130], None, vec![(16, ud, dd, -0.9)]),
            ];
            let (launches, elements, same) = check_batch(&d, s, &cases, kernel, 0xba7c);
            assert_eq!(
                launches, 2,
                "{kernel:?} {dtype}: one batched launch, one of its own"
            );
            eprintln!(
                "batched {kernel:?} {dtype}: {} tensors in {launches} launches, {elements} elements bit-identical to one launch each, {same} to the CPU",
                cases.len()
            );
            total.0 += elements;
            total.1 += same;
        }
    }
    // More tensors than one launch takes: two batched launches.
    let many: Vec<MergeCase> = (0..BATCH_MAX_JOBS + 4)
        .map(|i| {
            case(
                F16,
                &[20 + 7 * i, 60 + 11 * i],
                None,
                vec![(4 + i, F16, F16, 0.5)],
            )
        })
        .collect();
    for kernel in kernels {
        let (launches, elements, _) = check_batch(&d, s, &many, kernel, 0x3a4);
        assert_eq!(launches, 2, "{kernel:?}: {} tensors", many.len());
        total.0 += elements;
    }
    eprintln!("batched: {} elements checked in all", total.0);
    d.destroy_stream(s).unwrap();
}

/// W of `data` merged by `spec` on `d` with `kernel`, alone or as a batch
/// of one ([`CudaDevice::merge_lowrank_batch`]), on a fresh stream; W's
/// bytes read back.
fn merged_w(
    d: &CudaDevice,
    data: &CaseData,
    spec: &MergeSpec<'_>,
    kernel: LowRankKernel,
    batched: bool,
) -> Vec<u8> {
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(d);
    let (w, factors) = data.upload(&mut bufs, s);
    if batched {
        let m = LowRankMerge {
            spec,
            w,
            factors: &factors,
        };
        d.merge_lowrank_batch(&[m], s, kernel).unwrap();
    } else {
        d.merge_lowrank_with(spec, w, &factors, s, kernel).unwrap();
    }
    let mut out = vec![0u8; data.w.len()];
    d.read_blocking(w, &mut out, s).unwrap();
    drop(bufs);
    d.destroy_stream(s).unwrap();
    out
}

/// `Auto` routes each merge by the device's merge-kernel configuration: on a
/// device opened with [`CudaConfig::pipelined_merges`] (the default) the
/// pipelined tensor-core kernel from rank 16 up, on one opened without it
/// the unpipelined one from rank 32 up, fp32 FMA otherwise (and for f32
/// factors on both), and the streaming kernel on both for ranks adding up
/// to at most 8 into a large 16-bit W; alone and batched, bit for bit what the kernel it
/// chose gives when asked for by name, and the launch counts say that
/// kernel ran.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_auto_merges_route_by_the_merge_kernel_config() {
    use Dtype::{F16, F32};
    let open = |pipelined_merges: bool| {
        CudaDevice::with_config(
            0,
            &CudaConfig {
                pipelined_merges,
                ..CudaConfig::default()
            },
        )
        .expect("a CUDA GPU")
    };
    let (piped, plain) = (open(true), open(false));
    assert!(piped.pipelined_merges() && !plain.pipelined_merges());
    assert!(CudaConfig::default().pipelined_merges);
    let cases = [
        MergeCase {
            dtype: F16,
            shape: vec![300, 520],
            rows: Some(10..290),
            adapters: vec![(64, F16, F16, 0.5), (32, F16, F16, -0.25)],
        },
        // Rank 16: the pipelined kernel on one device, FMA on the other.
        MergeCase {
            dtype: F16,
            shape: vec![130, 260],
            rows: None,
            adapters: vec![(16, F16, F16, 0.75)],
        },
        MergeCase {
            dtype: F16,
            shape: vec![96, 200],
            rows: None,
            adapters: vec![(40, F32, F32, 0.7)],
        },
        // Rank 8 into a 16-bit W of 2²⁴ elements: the streaming kernel on
        // both, in a launch of its own when batched.
        MergeCase {
            dtype: F16,
            shape: vec![4096, 4096],
            rows: None,
            adapters: vec![(8, F16, F16, 0.5)],
        },
    ];
    let expected = [
        (LowRankKernel::Pipelined, LowRankKernel::TensorCores),
        (LowRankKernel::Pipelined, LowRankKernel::Fma),
        (LowRankKernel::Fma, LowRankKernel::Fma),
        (LowRankKernel::Streaming, LowRankKernel::Streaming),
    ];
    for (i, (case, &(on_piped, on_plain))) in cases.iter().zip(&expected).enumerate() {
        let data = CaseData::new(case, 0x9193 + i as u64);
        let adapters = data.adapters(case);
        let spec = MergeSpec::new(case.dtype, &case.shape, case.rows.clone(), &adapters).unwrap();
        let run = |d: &CudaDevice, kernel: LowRankKernel, batched: bool| {
            merged_w(d, &data, &spec, kernel, batched)
        };
        for (name, d, on) in [("pipelined", &piped, on_piped), ("plain", &plain, on_plain)] {
            assert_eq!(
                d.merge_uses_tensor_cores(&spec),
                matches!(on, LowRankKernel::TensorCores | LowRankKernel::Pipelined),
                "case {i} on the {name} device"
            );
            assert_eq!(
                d.auto_lowrank_kernel(&spec),
                on,
                "case {i} on the {name} device"
            );
            let want = run(d, on, false);
            for batched in [false, true] {
                let before = d.merge_launches();
                let got = run(d, LowRankKernel::Auto, batched);
                assert!(
                    got == want,
                    "case {i} on the {name} device (batched: {batched}): not bit for bit {on:?}"
                );
                // And the kernel that ran was that one, not another that
                // happens to give the same bits.
                let (single, batch, other) = launches_on(on, before, d.merge_launches()).unwrap();
                assert_eq!(
                    (single, batch, other),
                    if batched && on != LowRankKernel::Streaming {
                        (0, 1, 0)
                    } else {
                        (1, 0, 0)
                    },
                    "case {i} on the {name} device (batched: {batched}): launches on {on:?} and on other kernels"
                );
            }
            let same = data.check(case, &want);
            eprintln!(
                "case {i}: auto on the {name} device = {on:?}, {same} elements bit-identical to the CPU"
            );
        }
    }
}

/// Merges on a device whose merge grids are sized for one SM
/// ([`CudaConfig::merge_multiprocessors`]): every low-rank kernel, alone
/// and batched, gives bit for bit what it gives on a device that fills
/// every SM, on a W of more column strips than the capped grid has SM
/// slots (so each strip keeps one block that walks all of its rows), and
/// both match the CPU merge and the f64 reference.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merges_on_capped_grids_match_full_grids() {
    use Dtype::F16;
    let full = gpu();
    let capped = CudaDevice::with_config(
        0,
        &CudaConfig {
            merge_multiprocessors: Some(1),
            ..CudaConfig::default()
        },
    )
    .expect("a CUDA GPU");
    assert_eq!(full.merge_multiprocessors(), full.multiprocessors());
    assert_eq!(capped.merge_multiprocessors(), 1);
    assert!(capped.memory_mode_note().contains(MERGE_SMS_ENV));
    let tensor_cores = full
        .info()
        .compute_capability
        .is_some_and(|cc| cc >= offload_kernels::cuda::MMA_MIN_COMPUTE_CAPABILITY);
    let cases = [
        MergeCase {
            dtype: F16,
            shape: vec![700, 1300],
            rows: Some(50..650),
            adapters: vec![(8, F16, F16, 0.5)],
        },
        MergeCase {
            dtype: F16,
            shape: vec![300, 1100],
            rows: None,
            adapters: vec![(16, F16, F16, 0.75), (8, F16, F16, -0.25)],
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let data = CaseData::new(case, 0x5a11 + i as u64);
        let adapters = data.adapters(case);
        let spec = MergeSpec::new(case.dtype, &case.shape, case.rows.clone(), &adapters).unwrap();
        let run = |d: &CudaDevice, kernel: LowRankKernel, batched: bool| {
            merged_w(d, &data, &spec, kernel, batched)
        };
        for kernel in [
            LowRankKernel::Fma,
            LowRankKernel::Streaming,
            LowRankKernel::TensorCores,
            LowRankKernel::Pipelined,
        ] {
            if matches!(
                kernel,
                LowRankKernel::TensorCores | LowRankKernel::Pipelined
            ) && !tensor_cores
            {
                continue;
            }
            for batched in [false, true] {
                let want = run(&full, kernel, batched);
                let got = run(&capped, kernel, batched);
                assert!(
                    got == want,
                    "case {i}, {kernel:?} (batched: {batched}): the capped grid's W differs"
                );
                data.check(case, &got);
            }
        }
    }
}

/// [`Kernel::MergeBatch`] equals one [`Kernel::Merge`] per op, bit for bit:
/// low-rank ops batched (fp32 FMA and tensor cores, f16 and bf16 weights in
/// one batch), LoHa, LoKr and a low-rank op with more adapters than a job
/// takes on their own, and three ops on one weight (the second waits for
/// the first, the third, a LoHa on its own launch, for both). An op that
/// fails its checks is named in the error, and the ops before it are
/// merged.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_batch_kernel_matches_one_merge_per_op() {
    use Dtype::{BF16, F16, F32};
    let d = gpu();
    let s = d.create_stream().unwrap();
    // Weights in `bufs`, factors in `fbufs`.
    let mut bufs = Bufs::new(&d);
    let mut fbufs = Bufs::new(&d);
    let mut rng = Rng(0x6a7c);
    let mut f = |dt, r, c| merge_factor(&mut fbufs, s, &mut rng, dt, r, c);
    let ops = vec![
        // fp32 FMA (small ranks), f16 and bf16 W.
        op(
            F16,
            &[96, 200],
            Some(10..90),
            vec![lowrank(f(F16, 80, 8), f(BF16, 8, 200), 0.5)],
        ),
        op(
            BF16,
            &[64, 144],
            None,
            vec![lowrank(f(BF16, 64, 4), f(BF16, 4, 144), -0.7)],
        ),
        // Tensor cores (ranks 32 and 64).
        op(
            F16,
            &[256, 320],
            None,
            vec![
                lowrank(f(F16, 256, 32), f(F16, 32, 320), 0.4),
                lowrank(f(F16, 256, 64), f(F16, 64, 320), -0.2),
            ],
        ),
        // LoHa: the general kernel, on its own.
        op(
            F16,
            &[48, 100],
            None,
            vec![MergeAdapter {
                scale: 0.6,
                delta: MergeDelta::LoHa {
                    w1a: f(F16, 48, 4),
                    w1b: f(F32, 4, 100),
                    w2a: f(BF16, 48, 6),
                    w2b: f(F16, 6, 100),
                },
            }],
        ),
        // Six low-rank adapters: more than a job takes.
        op(
            BF16,
            &[40, 90],
            None,
            (0..6)
                .map(|i| lowrank(f(BF16, 40, 2 + i), f(BF16, 2 + i, 90), 0.1 * i as f32 - 0.3))
                .collect(),
        ),
        // LoKr.
        op(
            F32,
            &[60, 80],
            None,
            vec![MergeAdapter {
                scale: -0.4,
                delta: MergeDelta::LoKr {
                    w1: MergeKron::Full(f(F16, 4, 8)),
                    w2: MergeKron::LowRank {
                        a: f(BF16, 15, 3),
                        b: f(BF16, 3, 10),
                    },
                },
            }],
        ),
        op(
            F16,
            &[128, 64],
            Some(0..100),
            vec![lowrank(f(F16, 100, 40), f(F16, 40, 64), 1.1)],
        ),
    ];
    // The second merge of the first weight (rows 30..60 of it, overlapping
    // the first op's 10..90).
    let again = op(
        F16,
        &[96, 200],
        Some(30..60),
        vec![lowrank(f(F16, 30, 16), f(F16, 16, 200), -0.5)],
    );
    for o in &ops {
        o.validate().unwrap();
    }
    // The weights, side by side in one allocation (each aligned to 256).
    let mut offsets = Vec::new();
    let mut end = 0usize;
    for o in &ops {
        offsets.push(end);
        end = (end + o.weight_bytes()).next_multiple_of(256);
    }
    let mut entries: Vec<(usize, Arc<MergeOp>)> = offsets
        .iter()
        .zip(&ops)
        .map(|(&off, o)| (off, Arc::new(o.clone())))
        .collect();
    entries.insert(1, (offsets[0], Arc::new(again)));
    // A third merge of the first weight, rows 20..50 (overlapping both): a
    // LoHa, so the general kernel, launched on its own; it must still come
    // after the two low-rank merges waiting in their batches.
    let loha_again = op(
        F16,
        &[96, 200],
        Some(20..50),
        vec![MergeAdapter {
            scale: 0.3,
            delta: MergeDelta::LoHa {
                w1a: f(F16, 30, 4),
                w1b: f(F16, 4, 200),
                w2a: f(F16, 30, 2),
                w2b: f(F16, 2, 200),
            },
        }],
    );
    loha_again.validate().unwrap();
    entries.insert(2, (offsets[0], Arc::new(loha_again)));
    let init = encode(F16, &Rng(0x1717).values(end / 2));
    let one = bufs.upload(&init, s);
    let batched = bufs.upload(&init, s);
    for (off, o) in &entries {
        d.launch(
            &Kernel::Merge {
                w: one.offset(*off),
                op: o.clone(),
            },
            s,
        )
        .unwrap();
    }
    d.launch(
        &Kernel::MergeBatch {
            base: batched,
            ops: entries.clone().into(),
        },
        s,
    )
    .unwrap();
    let (mut a, mut b) = (vec![0u8; end], vec![0u8; end]);
    d.read_blocking(one, &mut a, s).unwrap();
    d.read_blocking(batched, &mut b, s).unwrap();
    assert_ne!(a, init);
    for (i, (off, o)) in entries.iter().enumerate() {
        let span = *off..off + o.weight_bytes();
        assert!(
            a[span.clone()] == b[span],
            "op {i} ({:?} {:?}) differs",
            o.dtype,
            o.shape
        );
    }
    assert!(a == b);

    // A misaligned factor in op 2 of 3: named; op 0 merged, op 2 not.
    let mut bad = (*entries[4].1).clone();
    if let MergeDelta::LowRank { up, .. } = &mut bad.adapters[0].delta {
        up.ptr = up.ptr.offset(1);
    }
    let trio: Arc<[(usize, Arc<MergeOp>)]> = vec![
        entries[0].clone(),
        entries[3].clone(),
        (entries[4].0, Arc::new(bad)),
    ]
    .into();
    let fresh = bufs.upload(&init, s);
    let e = d
        .launch(
            &Kernel::MergeBatch {
                base: fresh,
                ops: trio,
            },
            s,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Kernel { .. })
            && msg.contains("op 2 of 3 (F16 [256, 320] at ")
            && msg.contains("aligned"),
        "{msg}"
    );
    let mut c = vec![0u8; end];
    d.read_blocking(fresh, &mut c, s).unwrap();
    let w0 = offsets[0]..offsets[0] + ops[0].weight_bytes();
    let w2 = offsets[2]..offsets[2] + ops[2].weight_bytes();
    assert_ne!(
        c[w0.clone()],
        init[w0],
        "op 0 was merged before the failed op"
    );
    assert_eq!(c[w2.clone()], init[w2], "the failed op merged nothing");

    drop(bufs);
    drop(fbufs);
    d.destroy_stream(s).unwrap();
}

/// Informative: an SDXL-like layer, ten 1280 x 1280 f16 tensors with
/// adapters of ranks 32 and 64 (the tensor cores), merged by one launch per
/// tensor and by one batched launch.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_batch_kernel_throughput_of_a_layer() {
    use Dtype::F16;
    let d = gpu();
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(&d);
    let mut fbufs = Bufs::new(&d);
    let mut rng = Rng(0x6a7d);
    let mut f = |dt, r, c| merge_factor(&mut fbufs, s, &mut rng, dt, r, c);
    let (rows, cols, n) = (1280usize, 1280usize, 10usize);
    let layer: Vec<(usize, Arc<MergeOp>)> = (0..n)
        .map(|i| {
            let o = op(
                F16,
                &[rows, cols],
                None,
                vec![
                    lowrank(f(F16, rows, 32), f(F16, 32, cols), 0.5),
                    lowrank(f(F16, rows, 64), f(F16, 64, cols), 0.25),
                ],
            );
            (i * rows * cols * 2, Arc::new(o))
        })
        .collect();
    let base = bufs.alloc(n * rows * cols * 2);
    let per_op = || {
        for (off, o) in &layer {
            d.launch(
                &Kernel::Merge {
                    w: base.offset(*off),
                    op: o.clone(),
                },
                s,
            )
            .unwrap();
        }
    };
    let batch = Kernel::MergeBatch {
        base,
        ops: layer.clone().into(),
    };
    let time = |run: &dyn Fn()| {
        run();
        d.stream_synchronize(s).unwrap();
        let reps = 50;
        let t = Instant::now();
        for _ in 0..reps {
            run();
        }
        d.stream_synchronize(s).unwrap();
        t.elapsed() / reps
    };
    let t_one = time(&per_op);
    let t_batch = time(&|| d.launch(&batch, s).unwrap());
    eprintln!(
        "layer of {n} x 1280x1280 f16, ranks 32 + 64: {t_one:?} in {n} launches, {t_batch:?} batched ({:.2}x)",
        t_one.as_secs_f64() / t_batch.as_secs_f64()
    );
    // Both ways once more, from zeroed weights: bit for bit the same.
    let len = n * rows * cols * 2;
    let other = bufs.alloc(len);
    for w in [base, other] {
        d.launch(
            &Kernel::Fill {
                dst: w,
                len,
                value: 0,
            },
            s,
        )
        .unwrap();
    }
    per_op();
    d.launch(
        &Kernel::MergeBatch {
            base: other,
            ops: layer.clone().into(),
        },
        s,
    )
    .unwrap();
    let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
    d.read_blocking(base, &mut a, s).unwrap();
    d.read_blocking(other, &mut b, s).unwrap();
    assert!(a.iter().any(|&x| x != 0), "nothing was merged");
    assert!(
        a == b,
        "the batched layer differs from one launch per tensor"
    );
    drop(bufs);
    drop(fbufs);
    d.destroy_stream(s).unwrap();
}

/// A low-rank adapter of the `MergeBatch` tests.
fn lowrank(up: MergeFactor, down: MergeFactor, scale: f32) -> MergeAdapter {
    MergeAdapter {
        scale,
        delta: MergeDelta::LowRank { up, down },
    }
}

/// A merge op of the `MergeBatch` tests.
fn op(
    dtype: Dtype,
    shape: &[usize],
    rows: Option<std::ops::Range<usize>>,
    adapters: Vec<MergeAdapter>,
) -> MergeOp {
    MergeOp {
        dtype,
        shape: shape.to_vec(),
        rows,
        adapters,
    }
}

/// A random factor, on the host and uploaded.
fn merge_factor(
    bufs: &mut Bufs<'_>,
    s: StreamId,
    rng: &mut Rng,
    dtype: Dtype,
    rows: usize,
    cols: usize,
) -> MergeFactor {
    let host = encode(dtype, &rng.values(rows * cols));
    let ptr = bufs.upload(&host, s);
    MergeFactor {
        ptr,
        host: host.into(),
        dtype,
        rows,
        cols,
    }
}

/// A dense f64 matrix for the reference.
struct RefMat {
    rows: usize,
    cols: usize,
    v: Vec<f64>,
}

impl RefMat {
    /// The factor's values, or their absolute values.
    fn of(f: &Factor<'_>, abs: bool) -> RefMat {
        let mut v = decode(f.dtype, f.data);
        if abs {
            v.iter_mut().for_each(|x| *x = x.abs());
        }
        RefMat {
            rows: f.rows,
            cols: f.cols,
            v,
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.cols + j]
    }

    fn mul(&self, o: &RefMat) -> RefMat {
        let mut v = vec![0.0; self.rows * o.cols];
        for i in 0..self.rows {
            for j in 0..o.cols {
                v[i * o.cols + j] = (0..self.cols).map(|k| self.at(i, k) * o.at(k, j)).sum();
            }
        }
        RefMat {
            rows: self.rows,
            cols: o.cols,
            v,
        }
    }
}

/// An adapter's delta in f64 from the definitions (`abs`: the same with
/// every factor in absolute value, the tolerance's bound).
fn reference_delta(delta: &Delta<'_>, abs: bool) -> RefMat {
    let m = |f: &Factor<'_>| RefMat::of(f, abs);
    let side = |k: &KronFactor<'_>| match k {
        KronFactor::Full(f) => m(f),
        KronFactor::LowRank { a, b } => m(a).mul(&m(b)),
    };
    match delta {
        Delta::LowRank { up, down } => m(up).mul(&m(down)),
        Delta::LoHa { w1a, w1b, w2a, w2b } => {
            let (mut p, q) = (m(w1a).mul(&m(w1b)), m(w2a).mul(&m(w2b)));
            p.v.iter_mut().zip(&q.v).for_each(|(x, y)| *x *= y);
            p
        }
        Delta::LoKr { w1, w2 } => {
            let (a, b) = (side(w1), side(w2));
            let (rows, cols) = (a.rows * b.rows, a.cols * b.cols);
            let mut v = vec![0.0; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    v[i * cols + j] = a.at(i / b.rows, j / b.cols) * b.at(i % b.rows, j % b.cols);
                }
            }
            RefMat { rows, cols, v }
        }
    }
}

/// Runs `op` as `Kernel::Merge` on the GPU and with `merge_cpu` on the same
/// host bytes, and checks the GPU against the f64 reference with the
/// kernels' tolerance and against the CPU; returns (elements of the row
/// slice, how many are bit-identical to the CPU's).
fn check_merge_op(
    d: &CudaDevice,
    s: StreamId,
    bufs: &mut Bufs<'_>,
    op: MergeOp,
    seed: u64,
) -> (usize, usize) {
    op.validate().unwrap();
    let mut rng = Rng(seed | 1);
    let out = op.shape[0];
    let cols: usize = op.shape[1..].iter().product();
    let rows = op.rows.clone().unwrap_or(0..out);
    let w_bytes = encode(op.dtype, &rng.values(out * cols));
    let w = bufs.upload(&w_bytes, s);
    let op = Arc::new(op);
    d.launch(&Kernel::Merge { w, op: op.clone() }, s).unwrap();
    let mut gpu = vec![0u8; w_bytes.len()];
    d.read_blocking(w, &mut gpu, s).unwrap();

    let adapters = op.adapters_with(&mut |f| &f.host);
    let spec = MergeSpec::new(op.dtype, &op.shape, op.rows.clone(), &adapters).unwrap();
    let mut cpu = w_bytes.clone();
    offload_kernels::merge_cpu(&mut cpu, &spec, NonZeroUsize::new(2)).unwrap();

    let mut exact = decode(op.dtype, &w_bytes);
    let mut bound: Vec<f64> = exact.iter().map(|v| v.abs()).collect();
    for a in &adapters {
        let (dl, da) = (
            reference_delta(&a.delta, false),
            reference_delta(&a.delta, true),
        );
        assert_eq!((dl.rows, dl.cols), (rows.len(), cols));
        let sc = f64::from(a.scale);
        for i in 0..dl.rows {
            for j in 0..cols {
                let at = (rows.start + i) * cols + j;
                exact[at] += sc * dl.at(i, j);
                bound[at] += sc.abs() * da.at(i, j);
            }
        }
    }
    let same = check_merged(
        op.dtype,
        (out, cols),
        &rows,
        &w_bytes,
        (&gpu, &cpu),
        (&exact, &bound),
    );
    (rows.len() * cols, same)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_loha_lokr_match_cpu_merge() {
    use Dtype::{BF16, F16, F32};
    let d = gpu();
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(&d);
    let mut rng = Rng(0x10ca);
    let mut f = |dt, r, c| merge_factor(&mut bufs, s, &mut rng, dt, r, c);
    let lowrank = |up, down| MergeDelta::LowRank { up, down };
    let mut ops = Vec::new();
    for dtype in Dtype::ALL {
        // W [150, 200], rows 15..135: n = 120 = 8 · 15 = 4 · 30, cols 200 = 10 · 20 = 5 · 40.
        let (n, cols) = (120, 200);
        let adapters = vec![
            MergeAdapter {
                scale: 0.6,
                delta: MergeDelta::LoHa {
                    w1a: f(F16, n, 6),
                    w1b: f(BF16, 6, cols),
                    w2a: f(F32, n, 40),
                    w2b: f(F16, 40, cols),
                },
            },
            MergeAdapter {
                scale: -0.8,
                delta: MergeDelta::LoKr {
                    w1: MergeKron::Full(f(BF16, 8, 10)),
                    w2: MergeKron::Full(f(F16, 15, 20)),
                },
            },
            MergeAdapter {
                scale: 1.1,
                delta: MergeDelta::LoKr {
                    w1: MergeKron::LowRank {
                        a: f(F32, 8, 2),
                        b: f(F16, 2, 10),
                    },
                    w2: MergeKron::Full(f(BF16, 15, 20)),
                },
            },
            MergeAdapter {
                scale: 0.3,
                delta: MergeDelta::LoKr {
                    w1: MergeKron::Full(f(F16, 4, 5)),
                    w2: MergeKron::LowRank {
                        a: f(BF16, 30, 8),
                        b: f(BF16, 8, 40),
                    },
                },
            },
            MergeAdapter {
                scale: -0.5,
                delta: lowrank(f(F16, n, 16), f(F32, 16, cols)),
            },
        ];
        ops.push(MergeOp {
            dtype,
            shape: vec![150, 200],
            rows: Some(15..135),
            adapters,
        });
        // A 3x3 conv weight [64, 16, 3, 3], whole: cols 144 = 9 · 16.
        ops.push(MergeOp {
            dtype,
            shape: vec![64, 16, 3, 3],
            rows: None,
            adapters: vec![
                MergeAdapter {
                    scale: 1.0,
                    delta: MergeDelta::LoKr {
                        w1: MergeKron::Full(f(F32, 4, 9)),
                        w2: MergeKron::LowRank {
                            a: f(BF16, 16, 4),
                            b: f(BF16, 4, 16),
                        },
                    },
                },
                MergeAdapter {
                    scale: 0.5,
                    delta: MergeDelta::LoHa {
                        w1a: f(BF16, 64, 4),
                        w1b: f(BF16, 4, 144),
                        w2a: f(BF16, 64, 4),
                        w2b: f(BF16, 4, 144),
                    },
                },
            ],
        });
        // A scalar left side (kron of [1, 1] and the whole delta), one row.
        ops.push(MergeOp {
            dtype,
            shape: vec![3, 70],
            rows: Some(2..3),
            adapters: vec![MergeAdapter {
                scale: 2.0,
                delta: MergeDelta::LoKr {
                    w1: MergeKron::Full(f(F32, 1, 1)),
                    w2: MergeKron::LowRank {
                        a: f(F16, 1, 3),
                        b: f(F32, 3, 70),
                    },
                },
            }],
        });
        // More low-rank adapters than a low-rank launch takes: the general
        // kernel merges them in one launch (one rounding).
        ops.push(MergeOp {
            dtype,
            shape: vec![40, 90],
            rows: None,
            adapters: (0..MAX_ADAPTERS_FOR_TEST + 2)
                .map(|i| MergeAdapter {
                    scale: 0.2 * i as f32 - 0.9,
                    delta: lowrank(f(BF16, 40, 1 + 5 * i), f(F16, 1 + 5 * i, 90)),
                })
                .collect(),
        });
    }
    for (i, op) in ops.into_iter().enumerate() {
        let what = format!(
            "merge {} {:?} rows {:?}, {} adapters",
            op.dtype,
            op.shape,
            op.rows,
            op.adapters.len()
        );
        let (elements, same) = check_merge_op(&d, s, &mut bufs, op, 0xab + i as u64);
        eprintln!("{what}: {elements} elements, {same} bit-identical to the CPU");
    }

    // Throughput of realistic LyCORIS merges (informative): 1280 x 1280 f16,
    // LoHa of ranks 32 and 32, and LoKr w1 [16, 16] whole, w2 [80, 80] of rank 16.
    let (rows, cols) = (1280usize, 1280usize);
    let mut rng = Rng(0xbe4c);
    let mut f = |dt, r, c| merge_factor(&mut bufs, s, &mut rng, dt, r, c);
    let loha = MergeDelta::LoHa {
        w1a: f(F16, rows, 32),
        w1b: f(F16, 32, cols),
        w2a: f(F16, rows, 32),
        w2b: f(F16, 32, cols),
    };
    let lokr = MergeDelta::LoKr {
        w1: MergeKron::Full(f(F16, 16, 16)),
        w2: MergeKron::LowRank {
            a: f(F16, 80, 16),
            b: f(F16, 16, 80),
        },
    };
    let zeros = vec![0u8; rows * cols * 2];
    let w = bufs.upload(&zeros, s);
    for (name, delta) in [("LoHa 32/32", loha), ("LoKr 16x16 (x) 80x80 r16", lokr)] {
        let kernel = Kernel::Merge {
            w,
            op: Arc::new(MergeOp {
                dtype: F16,
                shape: vec![rows, cols],
                rows: None,
                adapters: vec![MergeAdapter { scale: 1.0, delta }],
            }),
        };
        d.launch(&kernel, s).unwrap();
        d.stream_synchronize(s).unwrap();
        let reps = 50;
        let t = Instant::now();
        for _ in 0..reps {
            d.launch(&kernel, s).unwrap();
        }
        d.stream_synchronize(s).unwrap();
        let per = t.elapsed() / reps;
        eprintln!(
            "merge {rows}x{cols} f16, {name}: {per:?} per launch, {:.0} GB/s of W read and written",
            (2 * rows * cols * 2) as f64 / per.as_secs_f64() / 1e9
        );
    }
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_merge_general_rejects_bad_operands() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(&d);
    // W [8, 6] f32; LoKr w1 [2, 3] whole, w2 [4, 2] whole.
    let w = bufs.alloc(8 * 6 * 4);
    let (w1b, w2b) = (vec![0u8; 2 * 3 * 4], vec![0u8; 4 * 2 * 4]);
    let (w1, w2) = (bufs.upload(&w1b, s), bufs.upload(&w2b, s));
    let adapters = [Adapter {
        scale: 1.0,
        delta: Delta::LoKr {
            w1: KronFactor::Full(Factor::new(&w1b, Dtype::F32, 2, 3)),
            w2: KronFactor::Full(Factor::new(&w2b, Dtype::F32, 4, 2)),
        },
    }];
    let spec = MergeSpec::new(Dtype::F32, &[8, 6], None, &adapters).unwrap();
    d.merge(&spec, w, &[vec![w1, w2]], s).unwrap();
    // Wrong counts, unmapped, misaligned, overlapping W, unknown stream.
    for bad in [vec![], vec![vec![w1]], vec![vec![w1, w2, w2]]] {
        assert!(matches!(
            d.merge(&spec, w, &bad, s),
            Err(Error::Kernel { .. })
        ));
    }
    assert!(matches!(
        d.merge(&spec, w, &[vec![w1, DevicePtr(0x10)]], s),
        Err(Error::BadAddress { .. })
    ));
    assert!(matches!(
        d.merge(&spec, w, &[vec![w1.offset(2), w2]], s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.merge(&spec, w, &[vec![w1, w.offset(8)]], s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.merge(&spec, w, &[vec![w1, w2]], StreamId(0xdead_0000)),
        Err(Error::UnknownStream(_))
    ));
    // merge_lowrank refuses it; Kernel::Merge takes it.
    assert!(matches!(
        d.merge_lowrank(&spec, w, &[(w1, w2)], s),
        Err(Error::Kernel { .. })
    ));
    d.stream_synchronize(s).unwrap();
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

/// Runs `Y = X · Wᵀ` on the GPU and on the CPU and compares, with the
/// CPU tests' tolerance plus one rounding of X to W's type (see
/// [`super::cublas`]). Returns the largest error relative to `Σ|x·w|`.
/// One `Y = X · Wᵀ` product on the device: random X (f32) and W, Y filled
/// with 0xff, inputs uploaded; [`MatmulCase::launch`] queues the product and
/// [`MatmulCase::verify`] checks Y against the CPU's.
struct MatmulCase<'a> {
    bufs: Bufs<'a>,
    x: Vec<f32>,
    w_bytes: Vec<u8>,
    dtype: Dtype,
    tokens: usize,
    n: usize,
    k: usize,
    ptrs: [DevicePtr; 3],
}

impl<'a> MatmulCase<'a> {
    fn new(
        d: &'a CudaDevice,
        s: StreamId,
        dtype: Dtype,
        dims: (usize, usize, usize),
        seed: u64,
    ) -> Self {
        Self::new_at(d, s, dtype, dims, seed, [0; 3])
    }

    /// X, W and Y at `offsets` bytes into their buffers (which are page
    /// aligned), for operands less aligned than an allocation.
    fn new_at(
        d: &'a CudaDevice,
        s: StreamId,
        dtype: Dtype,
        (tokens, n, k): (usize, usize, usize),
        seed: u64,
        [ox, ow, oy]: [usize; 3],
    ) -> Self {
        let mut rng = Rng(seed | 1);
        let x = rng.values(tokens * k);
        let w_bytes = encode(dtype, &rng.values(n * k));
        let mut bufs = Bufs::new(d);
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let xp = bufs.upload(&[vec![0u8; ox], xb].concat(), s).offset(ox);
        let wp = bufs
            .upload(&[vec![0u8; ow], w_bytes.clone()].concat(), s)
            .offset(ow);
        let yp = bufs.alloc(tokens * n * 4 + oy).offset(oy);
        d.launch(
            &Kernel::Fill {
                dst: yp,
                len: tokens * n * 4,
                value: 0xff,
            },
            s,
        )
        .unwrap();
        MatmulCase {
            bufs,
            x,
            w_bytes,
            dtype,
            tokens,
            n,
            k,
            ptrs: [xp, wp, yp],
        }
    }

    fn launch(&self, s: StreamId) {
        self.bufs.d.launch(&self.kernel(), s).unwrap();
    }

    /// The product.
    fn kernel(&self) -> Kernel {
        let [x, w, y] = self.ptrs;
        Kernel::Matmul {
            x,
            x_dtype: offload_kernels::Dtype::F32,
            tokens: self.tokens,
            w,
            w_dtype: self.dtype,
            n: self.n,
            k: self.k,
            y,
        }
    }

    /// New activations (from `seed`) written over X, at the same address.
    fn set_x(&mut self, seed: u64, s: StreamId) {
        self.x = Rng(seed | 1).values(self.tokens * self.k);
        let xb: Vec<u8> = self.x.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.bufs.d.write_blocking(self.ptrs[0], &xb, s).unwrap();
    }

    /// Y filled with 0xff again (NaN), so that a product that did not run fails [`Self::verify`].
    fn clear(&self, s: StreamId) {
        let fill = Kernel::Fill {
            dst: self.ptrs[2],
            len: self.tokens * self.n * 4,
            value: 0xff,
        };
        self.bufs.d.launch(&fill, s).unwrap();
    }

    /// The largest error relative to Σ|x·w|, after checking every output
    /// against the CPU's product within the bound of one rounding of X to W's type.
    fn verify(&self, s: StreamId) -> f64 {
        self.verify_with(&self.w_bytes, s)
    }

    /// [`Self::verify`] of the product with the weight `w_bytes` (of this case's type and shape).
    fn verify_with(&self, w_bytes: &[u8], s: StreamId) -> f64 {
        let (x, dtype) = (&self.x, self.dtype);
        let (tokens, n, k) = (self.tokens, self.n, self.k);
        let mut yb = vec![0u8; tokens * n * 4];
        self.bufs.d.read_blocking(self.ptrs[2], &mut yb, s).unwrap();
        let got = decode(Dtype::F32, &yb);
        let mut cpu = vec![0f32; tokens * n];
        offload_kernels::matmul_xwt(x, tokens, w_bytes, dtype, n, k, &mut cpu, None).unwrap();
        let wv = decode(dtype, w_bytes);
        // Unit roundoff of X rounded to W's type; f16's subnormal spacing for tiny activations.
        let (u, sub) = match dtype {
            Dtype::F32 => (0.0, 0.0),
            Dtype::F16 => (2f64.powi(-11), 2f64.powi(-25)),
            Dtype::BF16 => (2f64.powi(-8), 0.0),
        };
        let mut worst = 0f64;
        for t in 0..tokens {
            for j in 0..n {
                let (mut mag, mut wsum) = (0f64, 0f64);
                for c in 0..k {
                    mag += (f64::from(x[t * k + c]) * wv[j * k + c]).abs();
                    wsum += wv[j * k + c].abs();
                }
                let (g, c) = (got[t * n + j], f64::from(cpu[t * n + j]));
                let err = (g - c).abs();
                let tol = (u + 2.0 * TOL) * mag + sub * wsum + 1e-30;
                assert!(
                    !g.is_nan() && err <= tol,
                    "{dtype} tokens {tokens} n {n} k {k}: y[{t}, {j}] GPU {g:e}, CPU {c:e}, error {err:e} > {tol:e}"
                );
                worst = worst.max(err / (mag + 1e-30));
            }
        }
        worst
    }
}

fn check_matmul(
    d: &CudaDevice,
    s: StreamId,
    dtype: Dtype,
    tokens: usize,
    n: usize,
    k: usize,
    seed: u64,
) -> f64 {
    let case = MatmulCase::new(d, s, dtype, (tokens, n, k), seed);
    case.launch(s);
    case.verify(s)
}

/// Products queued behind a held stream: the second one's activations (80
/// KiB in bf16) are larger than the smallest scratch (64 KiB), so the
/// stream's conversion scratch grows while the first is
/// still queued, and the stream is destroyed before either has run. Both
/// results must be right: the backend keeps a stream's old scratch, and
/// the stream's last one, until the work queued before has run. The same
/// through cuBLASLt, whose per-stream workspace grows the same way where
/// the second product's algorithm asks for more (as the fake's does).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matmul_scratch_outlives_the_products_queued_on_it() {
    for d in [gemm_ex_gpu(), lt_gpu()] {
        scratch_outlives_queued_products(&d);
    }
}

fn scratch_outlives_queued_products(d: &CudaDevice) {
    let s = d.create_stream().unwrap();
    let small = MatmulCase::new(d, s, Dtype::F16, (2, 64, 128), 11);
    let large = MatmulCase::new(d, s, Dtype::BF16, (40, 48, 1024), 12);
    d.stream_synchronize(s).unwrap();
    d.launch_host_fn(
        s,
        Box::new(|| std::thread::sleep(std::time::Duration::from_millis(30))),
    )
    .unwrap();
    small.launch(s);
    large.launch(s);
    d.destroy_stream(s).unwrap();
    let s2 = d.create_stream().unwrap();
    small.verify(s2);
    large.verify(s2);
    d.destroy_stream(s2).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matmul_cublas_matches_cpu() {
    let d = gemm_ex_gpu();
    let info = d.prepare_matmul().expect("creating cuBLAS");
    eprintln!(
        "cuBLAS library names tried: {:?}; loaded {:?}; activation conversion: {}",
        cublas::library_candidates(),
        info.library,
        info.convert_error.as_deref().unwrap_or("built")
    );
    assert!(info.convert_error.is_none(), "{:?}", info.convert_error);
    let s = d.create_stream().unwrap();
    let shapes = [(1, 300, 520), (16, 257, 1030), (33, 64, 7), (4, 1, 1)];
    for dtype in Dtype::ALL {
        for (i, &(tokens, n, k)) in shapes.iter().enumerate() {
            let worst = check_matmul(&d, s, dtype, tokens, n, k, 77 + i as u64);
            eprintln!(
                "matmul {dtype} tokens {tokens} n {n} k {k}: largest error / Σ|x·w| = {worst:.2e}"
            );
        }
    }
    // A second stream gets its own scratch; destroying it frees that.
    let s2 = d.create_stream().unwrap();
    check_matmul(&d, s2, Dtype::BF16, 8, 100, 300, 5);
    check_matmul(&d, s, Dtype::F16, 8, 100, 300, 6);
    d.destroy_stream(s2).unwrap();
    check_matmul(&d, s, Dtype::BF16, 8, 100, 300, 7);
    d.destroy_stream(s).unwrap();
}

/// A device whose products go through `cublasGemmEx`
/// ([`MatmulLibrary::GemmEx`]) whatever `OFFLOAD_MATMUL` says, the other
/// settings from the environment as [`gpu`]'s.
fn gemm_ex_gpu() -> CudaDevice {
    gpu_with(MatmulLibrary::GemmEx)
}

/// A device whose products go through cuBLASLt ([`MatmulLibrary::Lt`]),
/// the other settings from the environment as [`gpu`]'s.
fn lt_gpu() -> CudaDevice {
    gpu_with(MatmulLibrary::Lt)
}

fn gpu_with(matmul: MatmulLibrary) -> CudaDevice {
    let config = CudaConfig {
        matmul,
        ..CudaConfig::from_env().expect("the OFFLOAD_* settings")
    };
    CudaDevice::with_config(0, &config).unwrap_or_else(|e| {
        panic!("this test needs a CUDA GPU and CudaDevice::with_config(0, {matmul:?}) failed: {e}")
    })
}

/// Products through cuBLASLt meet the same bound against the CPU as
/// `cublasGemmEx`'s, in every type: for shapes of aligned rows the
/// heuristic is asked once for each shape and type (a second round makes
/// no plan), it finds an algorithm for each, and every product goes
/// through `cublasLtMatmul`; odd leading dimensions and operands less
/// aligned than an allocation get plans of their own, and any shape
/// without an algorithm goes to `cublasGemmEx`, every product of it; a
/// second stream gets its own buffers, given back with the stream.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matmul_through_cublaslt_matches_cpu_and_plans_once() {
    let d = lt_gpu();
    let info = d.prepare_matmul().expect("creating cuBLAS and cuBLASLt");
    eprintln!(
        "cuBLASLt library names tried: {:?}; loaded {:?}",
        cublaslt::library_candidates(),
        info.lt_library
    );
    assert_eq!(info.interface, MatmulLibrary::Lt);
    assert!(d.memory_mode_note().contains("OFFLOAD_MATMUL=lt"));
    let s = d.create_stream().unwrap();
    let run = |shapes: &[(usize, usize, usize)], seed: u64| {
        for dtype in Dtype::ALL {
            for (i, &(tokens, n, k)) in shapes.iter().enumerate() {
                let worst = check_matmul(&d, s, dtype, tokens, n, k, seed + i as u64);
                eprintln!(
                    "cuBLASLt matmul {dtype} tokens {tokens} n {n} k {k}: largest error / Σ|x·w| = {worst:.2e}"
                );
            }
        }
        (Dtype::ALL.len() * shapes.len()) as u64
    };
    // Rows of whole 16-byte multiples in every type, on page-aligned
    // buffers: cuBLASLt has algorithms for these.
    let aligned = [(1, 304, 520), (16, 256, 1024)];
    for round in 1..=2u64 {
        let plans = run(&aligned, 177 + round);
        assert_eq!(
            d.matmul_launches(),
            MatmulLaunches {
                gemm_ex: 0,
                lt: plans * round,
                lt_plans: plans,
                lt_no_algorithm: 0,
            },
            "round {round}"
        );
    }
    // Odd leading dimensions, and operands less aligned than an
    // allocation (X and Y 4 bytes past a page, an f16 W 2 bytes past one):
    // plans of their own; a shape the heuristic has no algorithm for goes
    // to cublasGemmEx, every product of it.
    let before = d.matmul_launches();
    let odd = [(16, 257, 1030), (33, 64, 7), (4, 1, 1)];
    let mut products = run(&odd, 277) + run(&odd, 377);
    let mut plans = products / 2;
    for (dtype, offsets) in [(Dtype::F32, [4, 4, 4]), (Dtype::F16, [4, 2, 12])] {
        let case = MatmulCase::new_at(&d, s, dtype, (16, 257, 1030), 31, offsets);
        for _ in 0..2 {
            case.launch(s);
            let worst = case.verify(s);
            eprintln!(
                "cuBLASLt matmul {dtype} at offsets {offsets:?}: largest error / Σ|x·w| = {worst:.2e}"
            );
        }
        (products, plans) = (products + 2, plans + 1);
    }
    let l = d.matmul_launches();
    let (lt, gemm_ex) = (l.lt - before.lt, l.gemm_ex - before.gemm_ex);
    let (made, none) = (
        l.lt_plans - before.lt_plans,
        l.lt_no_algorithm - before.lt_no_algorithm,
    );
    eprintln!("odd shapes and alignments: {made} plans, {none} without an algorithm");
    assert_eq!(made, plans);
    assert_eq!(lt + gemm_ex, products);
    assert_eq!(
        gemm_ex,
        2 * none,
        "each shape without an algorithm ran twice"
    );
    // A second stream gets its own buffers (the bf16 weight's activation
    // scratch, and the workspace its algorithm asks for), given back with
    // the stream.
    let s2 = d.create_stream().unwrap();
    check_matmul(&d, s2, Dtype::BF16, 8, 104, 304, 5);
    assert!(d.matmul_buffer_streams().contains(&s2.0));
    d.destroy_stream(s2).unwrap();
    assert!(!d.matmul_buffer_streams().contains(&s2.0));
    assert!(d.matmul_buffer_streams().contains(&s.0));
    check_matmul(&d, s, Dtype::BF16, 8, 104, 304, 7);
    d.destroy_stream(s).unwrap();
    assert!(d.matmul_buffer_streams().is_empty());
}

/// With graphs on (`CudaConfig::graphs`), a list of products handed to
/// `launch_all` is queued product by product the first time, captured
/// into a graph the second, and that graph launched from then on, with the
/// results of the products queued one by one (new activations every
/// round), through either cuBLAS interface (f32 activations, so the
/// conversion kernels are in the graph too); the list in another order,
/// with another weight, or on another stream is a graph of its own; a kept
/// graph still runs after the stream's scratch has grown (the old buffer
/// outlives it); a list with an operand outside mapped memory is refused
/// with nothing queued; a stream's graphs go with it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_graphs_of_products_match_their_products_and_are_kept() {
    for matmul in [MatmulLibrary::GemmEx, MatmulLibrary::Lt] {
        let config = CudaConfig {
            matmul,
            graphs: true,
            ..CudaConfig::from_env().expect("the OFFLOAD_* settings")
        };
        let d = CudaDevice::with_config(0, &config).unwrap_or_else(|e| {
            panic!(
                "this test needs a CUDA GPU and CudaDevice::with_config(0, graphs on) failed: {e}"
            )
        });
        let s = d.create_stream().unwrap();
        let mut cases = [
            MatmulCase::new(&d, s, Dtype::F16, (16, 256, 1024), 501),
            MatmulCase::new(&d, s, Dtype::BF16, (3, 104, 304), 502),
            MatmulCase::new(&d, s, Dtype::F32, (16, 64, 520), 503),
        ];
        let list: Vec<Kernel> = cases.iter().map(MatmulCase::kernel).collect();
        let queued = |d: &CudaDevice| {
            let l = d.matmul_launches();
            l.gemm_ex + l.lt
        };
        let run = |cases: &[MatmulCase], list: &[Kernel], s: StreamId, what: &str| {
            for c in cases {
                c.clear(s);
            }
            d.launch_all(list, s).unwrap();
            for c in cases {
                let worst = c.verify(s);
                eprintln!(
                    "{matmul:?} graphs, {what}, {}: largest error / Σ|x·w| = {worst:.2e}",
                    c.dtype
                );
            }
        };
        for round in 1..=4u64 {
            for (i, c) in cases.iter_mut().enumerate() {
                c.set_x(600 + 10 * round + i as u64, s);
            }
            run(&cases, &list, s, &format!("round {round}"));
            let captured = u64::from(round >= 2);
            assert_eq!(
                d.graph_launches(),
                GraphLaunches {
                    first_seen: 3,
                    captured,
                    captured_products: 3 * captured,
                    launched: round - 1,
                    products: 3 * (round - 1),
                    cleared: 0,
                    failed: 0,
                },
                "{matmul:?}, round {round}"
            );
            // cuBLAS queued the products at the first sighting and the capture only.
            assert_eq!(queued(&d), 3 + 3 * captured, "{matmul:?}, round {round}");
        }
        let reversed: Vec<Kernel> = list.iter().rev().cloned().collect();
        run(&cases, &reversed, s, "reversed, first");
        run(&cases, &reversed, s, "reversed, captured");
        // The first product with another weight of its type and shape (only W differs): its own graph.
        let other = MatmulCase::new(&d, s, Dtype::F16, (16, 256, 1024), 504);
        let mut moved = list.clone();
        if let Kernel::Matmul { ref mut w, .. } = moved[0] {
            *w = other.ptrs[1];
        }
        for _ in 0..2 {
            cases[0].clear(s);
            d.launch_all(&moved, s).unwrap();
            cases[0].verify_with(&other.w_bytes, s);
        }
        let g = d.graph_launches();
        assert_eq!(
            (g.captured, g.launched, g.products),
            (3, 5, 15),
            "{matmul:?}"
        );
        assert_eq!(d.graphs_kept(), 3);
        // A product whose activations need a larger conversion scratch
        // (256 KiB, over the first 64 KiB) replaces the stream's buffer;
        // the kept graphs, which use the old one, still run right.
        let big = MatmulCase::new(&d, s, Dtype::F16, (64, 32, 2048), 505);
        run(
            std::slice::from_ref(&big),
            &[big.kernel()],
            s,
            "a larger scratch",
        );
        run(&cases, &list, s, "after the scratch grew");
        // Another stream: graphs of its own, gone with it.
        let s2 = d.create_stream().unwrap();
        run(&cases, &list, s2, "second stream, first");
        run(&cases, &list, s2, "second stream, captured");
        assert_eq!(d.graphs_kept(), 4);
        d.destroy_stream(s2).unwrap();
        assert_eq!(d.graphs_kept(), 3);
        // An operand outside mapped memory: refused before anything is queued.
        let mut bad = list.clone();
        if let Kernel::Matmul { ref mut w, .. } = bad[2] {
            *w = DevicePtr(8 << 40);
        }
        for c in &cases {
            c.clear(s);
        }
        let before = d.graph_launches();
        let e = d.launch_all(&bad, s).unwrap_err();
        assert!(matches!(e, Error::BadAddress { .. }), "{matmul:?}: {e}");
        let mut y = vec![0u8; 16 * 256 * 4];
        d.read_blocking(cases[0].ptrs[2], &mut y, s).unwrap();
        assert!(
            y.iter().all(|&b| b == 0xff),
            "{matmul:?}: a product of the refused list ran"
        );
        assert_eq!(d.graph_launches(), before, "{matmul:?}");
        run(&cases, &list, s, "last");
        assert_eq!(d.graph_launches().launched, before.launched + 1);
        assert_eq!(d.graphs_off(), None);
        drop((cases, other, big));
        d.destroy_stream(s).unwrap();
        assert_eq!(
            d.graphs_kept(),
            0,
            "{matmul:?}: the stream's graphs outlived it"
        );
    }
}

/// A capture the driver refuses turns graphs off for the device and says
/// why (`graphs_off`, `Device::warnings`, the device note); the products
/// run one by one with the same results, then and at every later call.
/// Only the fake driver can be made to refuse:
/// `tests::gpu_tests_pass_on_the_fake_driver` runs this test on it with
/// `OFFLOAD_FAKECUDA_NO_CAPTURE=1`.
#[test]
#[ignore = "needs offload-fakecuda with OFFLOAD_FAKECUDA_NO_CAPTURE=1 (gpu_tests_pass_on_the_fake_driver runs it)"]
fn fake_capture_refused_turns_graphs_off() {
    assert_eq!(
        std::env::var("OFFLOAD_FAKECUDA_NO_CAPTURE").as_deref(),
        Ok("1")
    );
    let config = CudaConfig {
        graphs: true,
        ..CudaConfig::default()
    };
    let d = CudaDevice::with_config(0, &config).expect("the fake driver");
    assert_eq!(d.info().name, offload_fakecuda::DEVICE_NAME);
    let s = d.create_stream().unwrap();
    let cases = [
        MatmulCase::new(&d, s, Dtype::F16, (16, 256, 1024), 701),
        MatmulCase::new(&d, s, Dtype::F32, (3, 64, 520), 702),
    ];
    let list: Vec<Kernel> = cases.iter().map(MatmulCase::kernel).collect();
    for _ in 0..3 {
        for c in &cases {
            c.clear(s);
        }
        d.launch_all(&list, s).unwrap();
        for c in &cases {
            c.verify(s);
        }
    }
    assert_eq!(
        d.graph_launches(),
        GraphLaunches {
            first_seen: 2,
            failed: 1,
            ..GraphLaunches::default()
        }
    );
    assert_eq!(
        d.matmul_launches().gemm_ex,
        6,
        "every product queued one by one"
    );
    let why = d.graphs_off().expect("graphs turned off");
    assert!(why.contains("cuStreamBeginCapture"), "{why}");
    assert_eq!(
        d.warnings(),
        vec![format!("OFFLOAD_GRAPHS=on, but graphs are off: {why}")]
    );
    assert!(d.memory_mode_note().contains("but graphs are off"));
    assert_eq!(d.graphs_kept(), 0);
    drop(cases);
    d.destroy_stream(s).unwrap();
}

/// Products through cuBLASLt of shapes its heuristic finds no algorithm
/// for go to `cublasGemmEx`, with the same results, and each shape is asked
/// about once. Only the fake driver can be made to find none:
/// `tests::gpu_tests_pass_on_the_fake_driver` runs this test on it with
/// `OFFLOAD_FAKECUDA_LT_NO_ALGORITHM=1`.
#[test]
#[ignore = "needs offload-fakecuda with OFFLOAD_FAKECUDA_LT_NO_ALGORITHM=1 (gpu_tests_pass_on_the_fake_driver runs it)"]
fn fake_lt_without_an_algorithm_falls_back_to_gemm_ex() {
    assert_eq!(
        std::env::var("OFFLOAD_FAKECUDA_LT_NO_ALGORITHM").as_deref(),
        Ok("1")
    );
    let config = CudaConfig {
        matmul: MatmulLibrary::Lt,
        ..CudaConfig::default()
    };
    let d = CudaDevice::with_config(0, &config).expect("the fake driver");
    assert_eq!(d.info().name, offload_fakecuda::DEVICE_NAME);
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(&d);
    let (tokens, n, k) = (3usize, 5usize, 4usize);
    let x: Vec<f32> = (0..tokens * k).map(|i| i as f32 * 0.5 - 2.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 1.0).collect();
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|f| f.to_le_bytes()).collect() };
    let (xp, wp, yp) = (
        bufs.upload(&bytes(&x), s),
        bufs.upload(&bytes(&w), s),
        bufs.alloc(tokens * n * 4),
    );
    let mm = Kernel::Matmul {
        x: xp,
        x_dtype: Dtype::F32,
        tokens,
        w: wp,
        w_dtype: Dtype::F32,
        n,
        k,
        y: yp,
    };
    let mut want = vec![0f32; tokens * n];
    offload_kernels::matmul_xwt(&x, tokens, &bytes(&w), Dtype::F32, n, k, &mut want, None).unwrap();
    for _ in 0..2 {
        d.launch(&mm, s).unwrap();
        let mut got = vec![0u8; tokens * n * 4];
        d.read_blocking(yp, &mut got, s).unwrap();
        assert_eq!(got, bytes(&want));
    }
    assert_eq!(
        d.matmul_launches(),
        MatmulLaunches {
            gemm_ex: 2,
            lt: 0,
            lt_plans: 1,
            lt_no_algorithm: 1,
        }
    );
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

/// Activations already of the weight's 16-bit type go to cuBLAS as they
/// are (`x_dtype`): every output matches the CPU's product of the same
/// values widened to f32 within the CPU tests' tolerance (no rounding of X
/// left to account for); X of another 16-bit type than W's, or 16-bit X
/// with an f32 W, is a kernel error that queues nothing.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matmul_takes_activations_of_the_weights_type() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let (tokens, n, k) = (16usize, 257usize, 1030usize);
    for dtype in [Dtype::F16, Dtype::BF16] {
        let mut rng = Rng(0xac7 ^ k as u64);
        let xb = encode(dtype, &rng.values(tokens * k));
        let x: Vec<f32> = decode(dtype, &xb).iter().map(|&v| v as f32).collect();
        let wb = encode(dtype, &rng.values(n * k));
        let wv = decode(dtype, &wb);
        let mut bufs = Bufs::new(&d);
        let (xp, wp, yp) = (
            bufs.upload(&xb, s),
            bufs.upload(&wb, s),
            bufs.alloc(tokens * n * 4),
        );
        let mm = |x_dtype, w_dtype| Kernel::Matmul {
            x: xp,
            x_dtype,
            tokens,
            w: wp,
            w_dtype,
            n,
            k,
            y: yp,
        };
        let other = if dtype == Dtype::F16 {
            Dtype::BF16
        } else {
            Dtype::F16
        };
        for (x_dtype, w_dtype) in [(dtype, other), (dtype, Dtype::F32)] {
            assert!(
                matches!(
                    d.launch(&mm(x_dtype, w_dtype), s),
                    Err(Error::Kernel { .. })
                ),
                "X {x_dtype} with W {w_dtype} must be refused"
            );
        }
        d.launch(&mm(dtype, dtype), s).unwrap();
        let mut yb = vec![0u8; tokens * n * 4];
        d.read_blocking(yp, &mut yb, s).unwrap();
        let got = decode(Dtype::F32, &yb);
        let mut cpu = vec![0f32; tokens * n];
        offload_kernels::matmul_xwt(&x, tokens, &wb, dtype, n, k, &mut cpu, None).unwrap();
        for t in 0..tokens {
            for j in 0..n {
                let mag: f64 = (0..k)
                    .map(|c| (f64::from(x[t * k + c]) * wv[j * k + c]).abs())
                    .sum();
                let (g, c) = (got[t * n + j], f64::from(cpu[t * n + j]));
                let tol = 2.0 * TOL * mag + 1e-30;
                assert!(
                    !g.is_nan() && (g - c).abs() <= tol,
                    "{dtype} X: y[{t}, {j}] GPU {g:e}, CPU {c:e} (tolerance {tol:e})"
                );
            }
        }
    }
    d.destroy_stream(s).unwrap();
}

/// `W += s · up · down` through cuBLAS (the per-adapter baseline of
/// `offload bench merge`), with `rows`, `cols` and `rank` all different so
/// that swapped leading dimensions or transposes show, against an f64
/// reference: within a rounding to W's type of the exact result (f32 W:
/// 2⁻²⁰ of the magnitudes, for cuBLAS's f32 sums).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_gemm_accumulate_matches_an_f64_reference() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let (rows, cols, rank, scale) = (37usize, 53usize, 5usize, -0.75f32);
    for (w_dtype, f_dtype) in [
        (Dtype::F32, Dtype::F32),
        (Dtype::F32, Dtype::F16),
        (Dtype::F16, Dtype::F16),
        (Dtype::BF16, Dtype::BF16),
    ] {
        let mut rng = Rng(0x5eed ^ rows as u64);
        let w = encode(w_dtype, &rng.values(rows * cols));
        let up = encode(f_dtype, &rng.values(rows * rank));
        let down = encode(f_dtype, &rng.values(rank * cols));
        let mut bufs = Bufs::new(&d);
        let (wp, upp, downp) = (
            bufs.upload(&w, s),
            bufs.upload(&up, s),
            bufs.upload(&down, s),
        );
        let op = GemmAccumulate {
            w: wp,
            w_dtype,
            rows,
            cols,
            up: upp,
            down: downp,
            factor_dtype: f_dtype,
            rank,
            scale,
        };
        d.gemm_accumulate(&op, s).unwrap();
        let mut got = vec![0u8; w.len()];
        d.read_blocking(wp, &mut got, s).unwrap();
        let (got, w0) = (decode(w_dtype, &got), decode(w_dtype, &w));
        let (u, dn) = (decode(f_dtype, &up), decode(f_dtype, &down));
        for i in 0..rows {
            for j in 0..cols {
                let (mut delta, mut mag) = (0f64, 0f64);
                for r in 0..rank {
                    delta += u[i * rank + r] * dn[r * cols + j];
                    mag += (u[i * rank + r] * dn[r * cols + j]).abs();
                }
                let want = w0[i * cols + j] + f64::from(scale) * delta;
                let bound = ulp(w_dtype, want)
                    + 2f64.powi(-20) * (w0[i * cols + j].abs() + f64::from(scale.abs()) * mag);
                let g = got[i * cols + j];
                assert!(
                    (g - want).abs() <= bound,
                    "W {w_dtype} factors {f_dtype} ({i}, {j}): got {g}, want {want} (bound {bound})"
                );
            }
        }
    }
    d.destroy_stream(s).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matmul_edge_cases_and_checks() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let mut bufs = Bufs::new(&d);
    let a = bufs.alloc(1 << 16);
    let y = bufs.alloc(1 << 16);
    d.write_blocking(a, &1.5f32.to_le_bytes().repeat(1 << 14), s)
        .unwrap();
    let mm = |x: DevicePtr, w: DevicePtr, w_dtype, tokens, n, k, y: DevicePtr| Kernel::Matmul {
        x,
        x_dtype: offload_kernels::Dtype::F32,
        tokens,
        w,
        w_dtype,
        n,
        k,
        y,
    };
    // As the benchmark probes it: X doubles as W (inputs may overlap).
    d.launch(&mm(a, a, Dtype::F32, 1, 1, 1, y), s).unwrap();
    let mut out = [0u8; 4];
    d.read_blocking(y, &mut out, s).unwrap();
    assert_eq!(f32::from_le_bytes(out), 2.25);
    // k = 0: Y is zeroed.
    d.launch(
        &Kernel::Fill {
            dst: y,
            len: 64,
            value: 0xff,
        },
        s,
    )
    .unwrap();
    d.launch(&mm(a, a, Dtype::F16, 4, 4, 0, y), s).unwrap();
    let mut out = [1u8; 64];
    d.read_blocking(y, &mut out, s).unwrap();
    assert_eq!(out, [0u8; 64]);
    // No tokens: nothing to do.
    d.launch(&mm(a, a, Dtype::F16, 0, 4, 4, y), s).unwrap();
    // Checks: unmapped, misaligned, overlapping output, unknown stream.
    assert!(matches!(
        d.launch(&mm(DevicePtr(0x40), a, Dtype::F32, 1, 1, 1, y), s),
        Err(Error::BadAddress { .. })
    ));
    assert!(matches!(
        d.launch(&mm(a.offset(2), a, Dtype::F32, 1, 1, 1, y), s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.launch(&mm(a, a.offset(1), Dtype::F16, 1, 1, 1, y), s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.launch(&mm(a, a, Dtype::F32, 2, 2, 2, a.offset(8)), s),
        Err(Error::Kernel { .. })
    ));
    assert!(matches!(
        d.launch(&mm(a, a, Dtype::F32, 1, 1, 1, y), StreamId(0xdead_0000)),
        Err(Error::UnknownStream(_))
    ));
    d.stream_synchronize(s).unwrap();
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

/// Informative: products of the benchmark's full SDXL width and of a
/// scale-4-sized layer, 16 tokens, through `cublasGemmEx` and through
/// cuBLASLt: the queueing thread's time a product (100 products queued
/// back to back, before the stream is synchronised) and the GPU's; then
/// the same for a list of 7 scale-4-sized products (a layer) queued as one
/// kept graph (`CudaConfig::graphs`).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_matmul_throughput() {
    for (interface, d) in [("cublasGemmEx", gemm_ex_gpu()), ("cuBLASLt", lt_gpu())] {
        for dims in [(16, 4096, 4096), (16, 640, 640)] {
            matmul_throughput(&d, interface, dims);
        }
    }
    let config = CudaConfig {
        graphs: true,
        ..CudaConfig::from_env().expect("the OFFLOAD_* settings")
    };
    let d = CudaDevice::with_config(0, &config).expect("a CUDA GPU, graphs on");
    graph_throughput(&d, (16, 640, 640), 7);
}

/// Zeroed X and W (room for f32) and Y of `[tokens, k] · [n, k]ᵀ` products, on `s`.
fn throughput_operands<'a>(
    d: &'a CudaDevice,
    s: StreamId,
    (tokens, n, k): (usize, usize, usize),
) -> (Bufs<'a>, [DevicePtr; 3]) {
    let mut bufs = Bufs::new(d);
    let x = bufs.alloc(tokens * k * 4);
    let w = bufs.alloc(n * k * 4);
    let y = bufs.alloc(tokens * n * 4);
    for (dst, len) in [(x, tokens * k * 4), (w, n * k * 4)] {
        d.launch(&Kernel::Fill { dst, len, value: 0 }, s).unwrap();
    }
    (bufs, [x, w, y])
}

/// The product of `dtype` activations and weight on `ptrs` (X, W, Y).
fn throughput_product(
    dtype: Dtype,
    (tokens, n, k): (usize, usize, usize),
    [x, w, y]: [DevicePtr; 3],
) -> Kernel {
    Kernel::Matmul {
        x,
        x_dtype: dtype,
        tokens,
        w,
        w_dtype: dtype,
        n,
        k,
        y,
    }
}

/// The queueing thread's time for each of 100 calls of `queue` back to
/// back, and the time for each until `s` has run them all.
fn timed_queueing(
    d: &CudaDevice,
    s: StreamId,
    mut queue: impl FnMut(),
) -> (std::time::Duration, std::time::Duration) {
    let reps = 100u32;
    let t = Instant::now();
    for _ in 0..reps {
        queue();
    }
    let queued = t.elapsed() / reps;
    d.stream_synchronize(s).unwrap();
    (queued, t.elapsed() / reps)
}

/// The queueing thread's time a list of `len` products `[tokens, k] ·
/// [n, k]ᵀ` launched as one kept graph (100 lists back to back), and the GPU's.
fn graph_throughput(d: &CudaDevice, dims: (usize, usize, usize), len: usize) {
    let (tokens, n, k) = dims;
    let s = d.create_stream().unwrap();
    let (bufs, ptrs) = throughput_operands(d, s, dims);
    for dtype in [Dtype::F16, Dtype::BF16] {
        let list = vec![throughput_product(dtype, dims, ptrs); len];
        // The first call queues the products one by one, the second captures them.
        let before = d.graph_launches();
        for _ in 0..2 {
            d.launch_all(&list, s).unwrap();
        }
        d.stream_synchronize(s).unwrap();
        assert_eq!(
            d.graph_launches().captured,
            before.captured + 1,
            "{:?}",
            d.graphs_off()
        );
        let (queued, per) = timed_queueing(d, s, || d.launch_all(&list, s).unwrap());
        eprintln!(
            "matmul graph ({:?}) of {len} {dtype} {tokens}x{k} · ({n}x{k})ᵀ, the same W each: queueing {queued:?} a list ({:?} a product); {per:?} a list in all",
            d.matmul,
            queued / len as u32
        );
    }
    drop(bufs);
    d.destroy_stream(s).unwrap();
}

fn matmul_throughput(d: &CudaDevice, interface: &str, dims: (usize, usize, usize)) {
    let (tokens, n, k) = dims;
    let s = d.create_stream().unwrap();
    let (bufs, ptrs) = throughput_operands(d, s, dims);
    for dtype in Dtype::ALL {
        // Activations of the weight's type, as `bench e2e` holds them.
        let mm = throughput_product(dtype, dims, ptrs);
        d.launch(&mm, s).unwrap();
        d.stream_synchronize(s).unwrap();
        let (queued, per) = timed_queueing(d, s, || d.launch(&mm, s).unwrap());
        eprintln!(
            "matmul {interface} {dtype} {tokens}x{k} · ({n}x{k})ᵀ: queueing {queued:?} a product; {per:?} a product in all, {:.0} GFLOP/s, W read at {:.0} GB/s",
            offload_kernels::matmul_flops(tokens, n, k) as f64 / per.as_secs_f64() / 1e9,
            (n * k * dtype.size_in_bytes()) as f64 / per.as_secs_f64() / 1e9
        );
    }
    drop(bufs);
    d.destroy_stream(s).unwrap();
}
