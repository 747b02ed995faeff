#!/usr/bin/env bash
# Kept as run on the GPU; shellcheck nits (SC2155, SC2012, SC2086: word
# splitting of fixed numbers) left as they were.
# shellcheck disable=SC2155,SC2012,SC2086
# One-off GPU sweep (2026-11-28): routing of the merge kernels, the staged
# host policy's knobs, LoRA overhead at scale 4 with equal-length rows,
# sequential pass noise, host memcpy bandwidth.
set -u
B=gpu-bin/offload
O=${OUT:-/tmp/sweep-out}; mkdir -p "$O"
export OFFLOAD_KERNEL_CACHE=$(mktemp -d)
T0=$(date +%s)
step() { # name, limit, command...
  local name=$1 lim=$2; shift 2
  echo "=== $name ($(( $(date +%s) - T0 )) s): $*"
  timeout "$lim" "$@" 2>&1
  echo "=== rc=$? $name"
}
{
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
nproc; grep -m1 'model name' /proc/cpuinfo; numactl -H 2>/dev/null | head -5; free -g | head -2
step "device prepare" 60 $B device --prepare
# 1. host memcpy ceiling (torch CPU copy, 1 GiB)
step "host memcpy" 40 python3 - <<'PY'
import time
try:
    import torch
except Exception as e:
    print("no torch:", e); raise SystemExit
n=1<<30
a=torch.ones(n,dtype=torch.uint8); b=torch.zeros(n,dtype=torch.uint8)
p=torch.zeros(n,dtype=torch.uint8).pin_memory()
for t in (1,2,4,8,16):
    torch.set_num_threads(t)
    for name,dst in (("pageable",b),("pinned",p)):
        dst.copy_(a); t1=time.perf_counter()
        for _ in range(4): dst.copy_(a)
        dt=(time.perf_counter()-t1)/4
        print(f"threads {t:2d} -> {name:8s}: {n/dt/1e9:6.1f} GB/s")
PY
# 2. merge routing
for k in tensor-cores pipelined; do
  for rc in "1280 1280" "640 640" "2560 640"; do set -- $rc
    step "merge batch $k W[$1,$2]" 40 $B bench merge --backend cuda --kernel $k --rows $1 --cols $2 --ranks 32 --adapters 2 --tensors 16
  done
done
for k in fma pipelined; do
  step "merge small ranks $k" 40 $B bench merge --backend cuda --kernel $k --ranks 8,16 --adapters 1,2
done
step "merge tc 5120" 40 $B bench merge --backend cuda --kernel tensor-cores --rows 5120 --cols 5120 --ranks 8,32 --adapters 1
# 3. staged policy knobs
for d in 2 8; do for m in 4 16 64; do for t in 4 16; do
  step "h2d staged depth $d mib $m threads $t" 40 $B bench h2d --sizes 64,256 --map-pages 0 --prefetch-depth $d --staging-buffer-mib $m --staging-threads $t --staging-buffers $((2*t))
done; done; done
# 4. LoRA overhead at scale 4, LoRA rows as long as the plain ones
step "e2e lora steps 20" 90 $B bench e2e --lora-modes fuse-on-upload --lora-steps 20
step "e2e lora steps 20 pipelined" 90 env OFFLOAD_MERGE_KERNEL=pipelined $B bench e2e --lora-modes fuse-on-upload --lora-steps 20
# 5. sequential noise
for i in 1 2 3; do step "e2e sequential $i" 40 $B bench e2e --mode sequential --no-lora; done
step "e2e sequential staged" 60 $B bench e2e --mode sequential --no-lora --host-policy staged
echo "total $(( $(date +%s) - T0 )) s"
} > "$O/sweep.log" 2>&1
tail -3 "$O/sweep.log"
