#!/usr/bin/env bash
# One-off GPU check (written 2026-11-29 without a GPU, for the next GPU
# session): what OFFLOAD_GRAPHS=on (each layer's products queued as one
# kept CUDA graph) changes, beyond gpu-check's step 6f (the sequential
# rounds and the sequential fuse-on-upload row with graphs). The balanced
# ratio over rounds with graphs off and on, each in its own process; the
# sequential rounds with graphs and cuBLASLt together, and with graphs
# and no stall timing (the runtime's own calls a layer); the balanced
# fuse-on-upload and the sequential unfused LoRA rows with graphs (the
# unfused low-rank products are in the layer's graph); the full size
# (scale 1), where the GPU's own time bounds a pass. About 250 s on an
# H200 (estimated); its steps' limits add up to 590 s, under the device
# tool's 600 s a command. Run from the repository root with gpu-bin/ built at
# the same commit (scripts/gpu-check --build-only). Writes
# $OUT/sweep/sweep.log and one tarball of the JSON (the device tool
# returns at most eight files). SIZE_ARGS (e.g. "--scale 16 --steps 4",
# for a rehearsal on offload-fakecuda) shrinks every e2e run and skips the
# full-size one.
set -u
read -r -a SIZE <<<"${SIZE_ARGS:-}"
B=gpu-bin/offload
O=${OUT:-/tmp/graphs-out}/sweep
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
    for g in off on; do
        step "e2e balanced, graphs $g, 3 rounds" 75 env OFFLOAD_GRAPHS="$g" \
            "$B" bench e2e --mode balanced --no-lora --rounds 3 --json "$J/bal-graphs-$g.json" "${SIZE[@]}"
    done
    step "e2e sequential, graphs and cuBLASLt, 5 rounds" 120 env OFFLOAD_GRAPHS=on OFFLOAD_MATMUL=lt \
        "$B" bench e2e --mode sequential --no-lora --rounds 5 --json "$J/seq-graphs-lt.json" "${SIZE[@]}"
    step "e2e sequential, graphs, no stall timing, 3 rounds" 90 env OFFLOAD_GRAPHS=on \
        "$B" bench e2e --mode sequential --no-lora --rounds 3 --no-stall-timing \
        --json "$J/seq-graphs-nostall.json" "${SIZE[@]}"
    step "e2e balanced fuse-on-upload, graphs" 60 env OFFLOAD_GRAPHS=on \
        "$B" bench e2e --mode balanced --lora-modes fuse-on-upload --lora-steps 20 \
        --json "$J/lora-balanced-graphs.json" "${SIZE[@]}"
    step "e2e sequential unfused, graphs" 60 env OFFLOAD_GRAPHS=on \
        "$B" bench e2e --mode sequential --lora-modes unfused --lora-steps 20 \
        --json "$J/lora-unfused-graphs.json" "${SIZE[@]}"
    if [ "${#SIZE[@]}" = 0 ]; then
        step "e2e full size, fuse-on-upload, graphs" 110 env OFFLOAD_GRAPHS=on \
            "$B" bench e2e --scale 1 --steps 10 --lora-modes fuse-on-upload --json "$J/full-graphs.json"
    fi
    echo "total $(($(date +%s) - T0)) s"
} >"$O/sweep.log" 2>&1
tar -C "$J" -czf "$O/json.tar.gz" .
rm -rf "$J" "$OFFLOAD_KERNEL_CACHE"
tail -3 "$O/sweep.log"
