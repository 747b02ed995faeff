#!/usr/bin/env bash
# One-off GPU check (2026-11-28, the third GPU session's third call, at
# 60169ed): the staged policy's defaults of that commit (a reader per CPU,
# at most 8; 1 MiB fill parts) against the knob settings around them; the
# runtime's share of the engine thread in sequential passes (bench e2e's
# acquire/release split), with and without the stall timing and the
# uploader thread; the fuse-on-upload overhead at scale 4 (two rounds each
# of sequential and balanced).
# Run from the repository root with gpu-bin/ built at the same commit.
set -u
B=gpu-bin/offload
O=${OUT:-/tmp/defaults-out}
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
    step "device prepare" 60 "$B" device --prepare
    for rep in 1 2; do
        step "h2d defaults (rep $rep)" 40 "$B" bench h2d --sizes 2,64,256 --map-pages 0
        step "h2d 4 threads 4096 KiB (rep $rep)" 40 "$B" bench h2d --sizes 2,64,256 --map-pages 0 \
            --staging-threads 4 --staging-part-kib 4096
        step "h2d 8 threads 512 KiB (rep $rep)" 40 "$B" bench h2d --sizes 2,64,256 --map-pages 0 \
            --staging-threads 8 --staging-part-kib 512
        step "h2d 4 threads 1024 KiB (rep $rep)" 40 "$B" bench h2d --sizes 2,64,256 --map-pages 0 \
            --staging-threads 4 --staging-part-kib 1024
    done
    step "e2e sequential staged (defaults)" 60 "$B" bench e2e --mode sequential --no-lora --host-policy staged
    for rep in 1 2 3; do
        step "e2e sequential (rep $rep)" 40 "$B" bench e2e --mode sequential --no-lora \
            --json "$O/seq-$rep.json"
        step "e2e sequential, no stall timing (rep $rep)" 40 "$B" bench e2e --mode sequential \
            --no-lora --no-stall-timing --json "$O/seq-nostall-$rep.json"
        step "e2e sequential, uploads inline (rep $rep)" 40 "$B" bench e2e --mode sequential \
            --no-lora --uploads inline --json "$O/seq-inline-$rep.json"
    done
    for rep in 1 2; do
        for m in sequential balanced; do
            step "e2e $m fuse-on-upload (rep $rep)" 40 "$B" bench e2e --mode "$m" \
                --lora-modes fuse-on-upload --lora-steps 20 --json "$O/lora-$m-$rep.json"
        done
    done
    echo "total $(($(date +%s) - T0)) s"
} >"$O/defaults.log" 2>&1
tail -3 "$O/defaults.log"
