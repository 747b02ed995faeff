#!/usr/bin/env bash
# One-off GPU check (written 2026-11-28 without a GPU, at 40f9030, for the
# next GPU session): what OFFLOAD_MATMUL=lt (the benchmark's products
# through cuBLASLt, an algorithm chosen once a shape) changes. The engine
# thread's queueing a product, both interfaces, from the throughput test;
# the sequential and balanced ratios over rounds, each interface in its
# own process (gpu-check's 6d and 6e give sequential once more); the
# balanced fuse-on-upload overhead at scale 4 (6e gives sequential's); and
# the full size (scale 1), where the GPU's own time bounds a pass, in case
# cuBLASLt's kernels are slower there. About 200 s on an H200 (estimated). Run from the repository root with gpu-bin/
# built at the same commit (scripts/gpu-check --build-only). Writes
# $OUT/sweep/sweep.log and one tarball of the JSON (the device tool
# returns at most eight files). SIZE_ARGS (e.g. "--scale 16 --steps 4",
# for a rehearsal on offload-fakecuda) shrinks every e2e run and skips the
# full-size one.
set -u
read -r -a SIZE <<<"${SIZE_ARGS:-}"
B=gpu-bin/offload
O=${OUT:-/tmp/cublaslt-out}/sweep
J=$(mktemp -d)
mkdir -p "$O"
OFFLOAD_KERNEL_CACHE=$(mktemp -d)
export OFFLOAD_KERNEL_CACHE
T0=$(date +%s)
step() {
    local name=$1 lim=$2
    shift 2
    echo "=== $name ($(($(date +%s) - T0)) s): $*"
    timeout "$lim" "$@" 2>&1
    echo "=== rc=$? $name"
}
{
    step "device prepare, lt" 60 env OFFLOAD_MATMUL=lt "$B" device --prepare
    rt=""
    for f in gpu-bin/tests/offload_runtime-*; do
        [ -x "$f" ] && rt=$f && break
    done
    if [ -n "$rt" ]; then
        step "matmul throughput and queueing, both interfaces" 120 "$rt" --ignored --exact \
            device::cuda::kernel_tests::gpu_matmul_throughput --nocapture
    fi
    for lib in gemm-ex lt; do
        step "e2e sequential, $lib, 5 rounds" 120 env OFFLOAD_MATMUL="$lib" \
            "$B" bench e2e --mode sequential --no-lora --rounds 5 --json "$J/seq-$lib.json" "${SIZE[@]}"
    done
    for lib in gemm-ex lt; do
        step "e2e balanced, $lib, 3 rounds" 90 env OFFLOAD_MATMUL="$lib" \
            "$B" bench e2e --mode balanced --no-lora --rounds 3 --json "$J/bal-$lib.json" "${SIZE[@]}"
    done
    step "e2e balanced fuse-on-upload, lt" 60 env OFFLOAD_MATMUL=lt \
        "$B" bench e2e --mode balanced --lora-modes fuse-on-upload --lora-steps 20 \
        --json "$J/lora-balanced-lt.json" "${SIZE[@]}"
    if [ "${#SIZE[@]}" = 0 ]; then
        step "e2e full size, fuse-on-upload, lt" 150 env OFFLOAD_MATMUL=lt \
            "$B" bench e2e --scale 1 --steps 10 --lora-modes fuse-on-upload --json "$J/full-lt.json"
    fi
    echo "total $(($(date +%s) - T0)) s"
} >"$O/sweep.log" 2>&1
tar -C "$J" -czf "$O/json.tar.gz" .
rm -rf "$J" "$OFFLOAD_KERNEL_CACHE"
tail -3 "$O/sweep.log"
