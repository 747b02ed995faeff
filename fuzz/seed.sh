#!/usr/bin/env bash
# Seed the fuzz corpora (fuzz/corpus/, .gitignored) from the real files in
# ../shared/data. Whole files are megabytes, which slows libFuzzer to a few
# executions a second, so each real file also gives small, valid seeds: its
# header cut down to its first 1, 8 and 32 tensors (and at most 64 KiB of
# data), offsets rewritten, data bytes copied. The committed regression
# inputs (loader/tests/fuzz-regressions/) seed both targets too.
# Usage: fuzz/seed.sh [--whole]   (--whole: also copy the whole files)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${OFFLOAD_DATA:-$here/../../shared/data}"
st="$here/corpus/safetensors_header"
lo="$here/corpus/lora_file"
mkdir -p "$st" "$lo"
python3 - "$data" "$st" "$lo" <<'PY'
import json, os, struct, sys
data, st, lo = sys.argv[1:4]
def cut(path, n, budget=64 << 10):
    raw = open(path, "rb").read()
    hlen = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + hlen])
    meta = header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    out, blob = {}, b""
    if meta is not None:
        out["__metadata__"] = meta
    for name, t in items[:n]:
        a, b = t["data_offsets"]
        if len(blob) + (b - a) > budget:
            continue
        chunk = raw[8 + hlen + a: 8 + hlen + b]
        out[name] = {"dtype": t["dtype"], "shape": t["shape"],
                     "data_offsets": [len(blob), len(blob) + len(chunk)]}
        blob += chunk
    h = json.dumps(out, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob
for sub, dests in (("model", [st]), ("lora", [st, lo])):
    d = os.path.join(data, sub)
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        for n in (1, 8, 32):
            seed = cut(os.path.join(d, f), n)
            for dest in dests:
                open(os.path.join(dest, f"{f[:-12]}-{n}.seed"), "wb").write(seed)
PY
if [ "${1:-}" = "--whole" ]; then
    cp "$data"/model/*.safetensors "$data"/lora/*.safetensors "$st/"
    cp "$data"/lora/*.safetensors "$lo/"
fi
reg="$here/../loader/tests/fuzz-regressions"
if [ -d "$reg" ]; then
    find "$reg/safetensors" -type f -exec cp {} "$st/" \; 2>/dev/null || true
    find "$reg/lora" -type f -exec cp {} "$lo/" \; 2>/dev/null || true
fi
echo "seeds: $(ls "$st" | wc -l) safetensors_header, $(ls "$lo" | wc -l) lora_file"
