#!/usr/bin/env bash
# One-off GPU check (2026-11-28, the fourth GPU session, at 72bef79): what
# `bench e2e --activations` changes at scale 4 (the layer products in one
# launch each, X held in the weights' type, against f32 X rounded by a
# conversion kernel before every product): balanced passes over rounds,
# and the fuse-on-upload overhead of sequential and balanced with each;
# and the streaming merge kernels against `auto` on larger weights than
# bench merge's default (rank 8 to 32, one and two adapters).
# Run from the repository root with gpu-bin/ built at the same commit.
set -u
B=gpu-bin/offload
O=${OUT:-/tmp/activations-out}/sweep
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
    for act in weights f32; do
        step "e2e balanced, $act, 3 rounds" 60 "$B" bench e2e --mode balanced --no-lora \
            --rounds 3 --activations "$act" --json "$O/bal-$act.json"
    done
    for rep in 1 2; do
        for m in sequential balanced; do
            for act in weights f32; do
                step "e2e $m fuse-on-upload, $act (rep $rep)" 40 "$B" bench e2e --mode "$m" \
                    --lora-modes fuse-on-upload --lora-steps 20 --activations "$act" \
                    --json "$O/lora-$m-$act-$rep.json"
            done
        done
    done
    for shape in 5120x5120 10240x5120 1280x5120; do
        rows=${shape%x*} cols=${shape#*x}
        for k in streaming auto; do
            step "merge $shape $k" 60 "$B" bench merge --backend cuda --kernel "$k" \
                --rows "$rows" --cols "$cols" --ranks 8,16,32 --adapters 1,2
        done
    done
    echo "total $(($(date +%s) - T0)) s"
} >"$O/sweep.log" 2>&1
tail -3 "$O/sweep.log"
