#!/usr/bin/env bash
# Kept as run on the GPU; shellcheck nits (SC2155, SC2012, SC2086: word
# splitting of fixed numbers) left as they were.
# shellcheck disable=SC2155,SC2012,SC2086
# One-off GPU check (2026-11-28, third run): the new merge routing, the
# staged policy's fill-part size A/B, staged e2e, the changed GPU tests.
set -u
B=gpu-bin/offload
O=${OUT:-/tmp/final-out}; mkdir -p "$O"
export OFFLOAD_KERNEL_CACHE=$(mktemp -d)
T0=$(date +%s)
step() { local name=$1 lim=$2; shift 2
  echo "=== $name ($(( $(date +%s) - T0 )) s): $*"; timeout "$lim" "$@" 2>&1; echo "=== rc=$? $name"; }
{
step "device prepare" 60 $B device --prepare
RT=$(ls gpu-bin/tests/offload_runtime-* | head -1)
step "gpu tests (routing)" 90 "$RT" --ignored --test-threads=1 --nocapture gpu_auto_merges_route_by_the_merge_kernel_config gpu_merge_lowrank_tensor_cores_match_cpu_merge gpu_merge_lowrank_batch_matches_one_launch_per_tensor gpu_merge_batch_kernel_matches_one_merge_per_op
step "merge auto" 40 $B bench merge --backend cuda
step "merge auto small ranks" 40 $B bench merge --backend cuda --ranks 8,16 --adapters 1,2
for rep in 1 2; do for p in 4096 1024 256; do
  step "h2d staged part $p KiB (rep $rep)" 40 $B bench h2d --sizes 2,64,256 --map-pages 0 --staging-part-kib $p
done; done
for rep in 1 2; do step "e2e sequential staged (rep $rep)" 60 $B bench e2e --mode sequential --no-lora --host-policy staged; done
step "e2e lora 20 steps" 90 $B bench e2e --lora-modes fuse-on-upload --lora-steps 20 --json "$O/e2e-lora20.json"
echo "total $(( $(date +%s) - T0 )) s"
} > "$O/final.log" 2>&1
tail -3 "$O/final.log"
