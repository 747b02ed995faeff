#!/usr/bin/env python3
"""PyTorch peers of `offload bench e2e`, timed on the same layer stack.

Reads a single-file safetensors checkpoint (the one `offload synth sdxl
--scale 4 -o DIR` writes is the model `offload bench e2e` runs by default),
groups its tensors into components and layers exactly as Offload's loader
does (a port of loader/src/layout.rs, checked against it), and runs one
generation per peer mode with the benchmark's compute: the text encoders
once, the denoiser --steps times, the VAE once; in every layer, for every
2-D or 4-D f32/f16/bf16 weight W [n, k] (a conv weight viewed as
[out, in*kh*kw]), Y = X . W^T with X the first tokens*k values of one
activation buffer seen as [tokens, k], in W's dtype, and Y f32 [tokens, n]
(what Offload's cuBLAS path does: one GEMM with f32 accumulation and f32
output). With --activations weights (the default, as `offload bench e2e`'s)
the buffer is held in each weight dtype, as an engine running in f16 keeps
its activations; with --activations f32 it is f32 and converted to W's
dtype before every product (a second kernel per product, as Offload's
`--activations f32`). The choice is passed on to `offload bench e2e`.

Peer modes (see bench/peers/README.md for what is and is not the same as
Offload's rows):

  none             every weight on the GPU
  accelerate       accelerate.cpu_offload (sequential; what diffusers'
                   enable_sequential_cpu_offload uses)
  block            block-level offload, one block (= one Offload layer)
                   prefetched ahead on a side CUDA stream from pinned host
                   copies, hand-offs by CUDA events, each block's device
                   copy dropped after use: our re-implementation of
                   diffusers' group offloading (block_level, use_stream=True)
                   without its host waits, prefetching across component
                   and pass boundaries
  block-packed     the same with each block packed in one pinned buffer:
                   one copy per block instead of one per tensor
  block-sync       the block peer synchronised as diffusers' group offloading
                   does by default (record_stream=False): the host waits for
                   the side stream before each block and for the compute
                   stream after it, no prefetch across a component's pass
  model            accelerate.cpu_offload_with_hook chained over the
                   components (what diffusers' enable_model_cpu_offload uses)
  diffusers        diffusers' own apply_group_offloading (block_level,
                   use_stream=True), only when `import diffusers` works

With --offload-bin, `offload bench e2e --model FILE --no-lora --json ...`
runs on the same file first, and one table holds both, with a verdict per
the performance target (Offload sequential and balanced faster than the
peers' equivalents). --dry-run needs no torch: it reads the file, builds
the layout and prints what a pass computes.
"""

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = float(1 << 20)

# --------------------------------------------------------------------------
# safetensors header (pure Python)
# --------------------------------------------------------------------------

# dtype name -> bytes per element (as Offload's loader knows them)
DTYPE_SIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# The element types Offload's matrix product takes (`DType::kernel`).
KERNEL_DTYPES = ("F32", "F16", "BF16")


class InputError(Exception):
    """Bad input: a clear message, no traceback."""


class TensorRef:
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")

    def __init__(self, name, dtype, shape, offset, nbytes):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.offset = offset  # absolute, in the file
        self.nbytes = nbytes


def read_safetensors_header(path):
    """The tensors of a safetensors file, sorted as the loader sorts them
    (data offset, length, name), with absolute offsets; and the metadata."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file")
    if p.is_dir():
        raise InputError(
            f"{path}: a folder; give one .safetensors file (as `offload synth` writes)"
        )
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: {size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n < 2 or n > 100_000_000 or 8 + n > size:
            raise InputError(
                f"{path}: not a safetensors file (header length {n} in a {size}-byte file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    tensors = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise InputError(f"{path}: tensor `{name}`: not an object")
        dt = e.get("dtype")
        shape = e.get("shape")
        offs = e.get("data_offsets")
        if dt not in DTYPE_SIZE:
            raise InputError(f"{path}: tensor `{name}`: unknown dtype {dt!r}")
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise InputError(f"{path}: tensor `{name}`: bad shape {shape!r}")
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            and 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise InputError(
                f"{path}: tensor `{name}`: bad data_offsets {offs!r} ({data_len} data bytes)"
            )
        count = math.prod(shape)
        if count * DTYPE_SIZE[dt] != offs[1] - offs[0]:
            raise InputError(
                f"{path}: tensor `{name}`: {offs[1] - offs[0]} bytes for shape {shape} {dt}"
            )
        tensors.append(TensorRef(name, dt, list(shape), data_start + offs[0], offs[1] - offs[0]))
    if not tensors:
        raise InputError(f"{path}: holds no tensors")
    tensors.sort(key=lambda t: (t.offset, t.nbytes, t.name))
    return tensors, meta


# --------------------------------------------------------------------------
# Layout: a port of loader/src/layout.rs for a single file (no diffusers
# folder, no shards). Same component names and kinds, same layers, same
# order; bench/peers/README.md says how it was checked.
# --------------------------------------------------------------------------

TEXT_ENCODER, DENOISER, VAE, OTHER = 0, 1, 2, 3  # ComponentKind's order
KIND_NAMES = {TEXT_ENCODER: "text_encoder", DENOISER: "denoiser", VAE: "vae", OTHER: "other"}
REMAINDER = "remainder"
U64_MAX = (1 << 64) - 1

PREFIXES = [
    ("model.diffusion_model.", "", DENOISER),
    ("first_stage_model.", "vae", VAE),
    ("cond_stage_model.transformer.", "text_encoder", TEXT_ENCODER),
    ("cond_stage_model.model.", "text_encoder", TEXT_ENCODER),
    ("cond_stage_model.", "text_encoder", TEXT_ENCODER),
    ("model_ema.", "model_ema", OTHER),
]

INDEXED = {
    "output_blocks", "input_blocks", "middle_block", "down_blocks", "up_blocks",
    "resnets", "attentions", "downsamplers", "upsamplers", "transformer_blocks",
    "single_transformer_blocks", "double_blocks", "single_blocks", "joint_blocks",
    "layers", "resblocks", "block", "blocks", "h", "down", "up",
}
NAMED_CONTAINERS = {"mid"}
SUBLAYERS = {"downsample", "upsample"}
PRE = [
    "embeddings", "embed_tokens", "shared", "token_embedding", "positional_embedding",
    "wte", "wpe", "time_proj", "time_embed", "time_embedding", "label_emb",
    "add_embedding", "class_embedding", "encoder_hid_proj", "conv_in", "img_in",
    "time_in", "guidance_in", "vector_in", "txt_in", "pos_embed", "x_embedder",
    "t_embedder", "y_embedder", "time_text_embed", "context_embedder", "proj_in",
]
POST = [
    "norm_out", "conv_norm_out", "out", "conv_out", "final_layer", "final_layer_norm",
    "norm", "ln_f", "ln_final", "proj_out", "text_projection", "logit_scale", "lm_head",
]
MID = [
    "encoder", "quant_conv", "post_quant_conv", "decoder", "input_blocks",
    "middle_block", "output_blocks", "down_blocks", "mid_block", "up_blocks", "down",
    "mid", "up", "joint_blocks", "double_blocks", "single_blocks",
    "transformer_blocks", "single_transformer_blocks", "block_1", "attn_1", "block_2",
]
_U64_RE = re.compile(r"^\+?[0-9]+$")


def parse_u64(s):
    """Rust's `str::parse::<u64>()`: optional '+', ASCII digits, no overflow."""
    if not _U64_RE.match(s):
        return None
    v = int(s.lstrip("+"))
    return v if v <= U64_MAX else None


def is_index(s):
    return s != "" and all("0" <= c <= "9" for c in s)


def prefixed_component(name):
    """(prefix, component name, kind) of a single-file tensor name, or None."""
    if name.startswith("conditioner.embedders."):
        rest = name[len("conditioner.embedders."):]
        if "." not in rest:
            return None
        n, rest = rest.split(".", 1)
        idx = parse_u64(n)
        if idx is None:
            return None
        comp = "text_encoder" if idx == 0 else f"text_encoder_{idx + 1}"
        inner = next((p for p in ("transformer.", "model.") if rest.startswith(p)), "")
        return (f"conditioner.embedders.{n}.{inner}", comp, TEXT_ENCODER)
    if name.startswith("text_encoders."):
        rest = name[len("text_encoders."):]
        if "." not in rest:
            return None
        n, rest = rest.split(".", 1)
        inner = "transformer." if rest.startswith("transformer.") else ""
        return (f"text_encoders.{n}.{inner}", n, TEXT_ENCODER)
    for p, c, k in PREFIXES:
        if name.startswith(p):
            return (p, c, k)
    return None


def classify_unprefixed(names, file_stem):
    """(name, kind, recognised) of a component with no prefix."""
    dit = ("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks.",
           "single_transformer_blocks.")
    if any(n.startswith(dit) for n in names):
        return ("transformer", DENOISER, True)
    if any(n.startswith(("input_blocks.", "down_blocks.")) for n in names):
        return ("unet", DENOISER, True)
    if any(n.startswith("decoder.") or n.startswith("encoder.down") for n in names):
        return ("vae", VAE, True)
    if any(n.startswith(("text_model.", "encoder.block.")) or n == "shared.weight" for n in names):
        return ("text_encoder", TEXT_ENCODER, True)
    if any(n.startswith(("model.layers.", "layers.")) for n in names):
        return ("model", OTHER, True)
    stem = file_stem.lower()
    kind = VAE if any(k in stem for k in ("vae", "taesd", "taef")) else OTHER
    return (file_stem if file_stem else "model", kind, False)


def raw_layer_len(segs):
    """Leading segments of a component-relative name that name its layer; None: remainder."""
    if segs and is_index(segs[0]):
        return 1
    end = None
    i = 0
    while i < len(segs):
        s = segs[i]
        next_is_index = i + 1 < len(segs) and is_index(segs[i + 1])
        if s in INDEXED and next_is_index:
            e = i + 2
            if s in ("input_blocks", "output_blocks") and e < len(segs) and is_index(segs[e]):
                e += 1
            if e < len(segs) and segs[e] in SUBLAYERS:
                e += 1
            end = e
            i = e
            continue
        if s in NAMED_CONTAINERS and i + 2 < len(segs) and not next_is_index:
            end = i + 2
            i += 2
            continue
        i += 1
    if end is not None:
        return end
    for p, s in enumerate(segs):
        if s in PRE or s in POST or s in MID[1:3]:
            return p + 1
    return None


# Sort keys mirror Rust's `enum Key { First, Name(u8, usize, String), Num(u64) }`.
def _name_key(s):
    if s in PRE:
        return (1, 0, PRE.index(s), "")
    if s in MID:
        return (1, 1, MID.index(s), "")
    if s in POST:
        return (1, 3, POST.index(s), "")
    return (1, 2, 0, s)


_STAGE = (1, 1, U64_MAX, "")


def _num(n):
    return (2, n)


def layer_key(name):
    if name == REMAINDER:
        return [(0,)]
    segs = name.split(".")
    key = []
    i = 0
    while i < len(segs):
        s = segs[i]
        idx = parse_u64(segs[i + 1]) if i + 1 < len(segs) else None
        if s in ("resnets", "block") and idx is not None:
            key += [_STAGE, _num(idx), _num(0)]
            i += 2
        elif s in ("attentions", "attn") and idx is not None:
            key += [_STAGE, _num(idx), _num(1)]
            i += 2
        elif s in ("downsamplers", "upsamplers") and idx is not None:
            key += [_STAGE, _num(U64_MAX), _num(idx)]
            i += 2
        elif s in ("downsample", "upsample"):
            key += [_STAGE, _num(U64_MAX)]
            i += 1
        elif s == "up" and idx is not None and "decoder" in segs[:i]:
            key += [_name_key(s), _num(max(U64_MAX - 1 - idx, 0))]
            i += 2
        else:
            v = parse_u64(s)
            key.append(_num(v) if v is not None else _name_key(s))
            i += 1
    return key


def assign_layers(rel_names):
    raw = []
    for n in rel_names:
        segs = n.split(".")
        ln = raw_layer_len(segs)
        raw.append(None if ln is None else ".".join(segs[:ln]))
    wrappers = set()
    for l in raw:
        if l is not None:
            i = l.rfind(".transformer_blocks.")
            if i >= 0:
                wrappers.add(l[:i])
    out = []
    for l, n in zip(raw, rel_names):
        if l is None:
            out.append(REMAINDER)
        elif l in wrappers:
            rest = n[len(l) + 1:]
            if rest.startswith("proj_out.") or rest == "proj_out":
                out.append(f"{l}.proj_out")
            else:
                out.append(f"{l}.proj_in")
        else:
            out.append(l)
    return out


class Layer:
    def __init__(self, name, tensors):
        self.name = name
        self.tensors = tensors

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.tensors)


class Component:
    def __init__(self, name, kind, prefix, layers):
        self.name = name
        self.kind = kind
        self.prefix = prefix
        self.layers = layers

    @property
    def nbytes(self):
        return sum(l.nbytes for l in self.layers)


def build_component(name, kind, prefix, tensors):
    rel = [t.name[len(prefix):] if t.name.startswith(prefix) else t.name for t in tensors]
    groups = {}
    for t, l in zip(tensors, assign_layers(rel)):
        groups.setdefault(l, []).append(t)
    layers = []
    for lname, ts in groups.items():
        # One file: (file, data_offset, name) is (data_offset, name).
        ts.sort(key=lambda t: (t.offset, t.name))
        layers.append(Layer(lname, ts))
    layers.sort(key=lambda l: (layer_key(l.name), l.name))
    return Component(name, kind, prefix, layers)


def build_layout(tensors, file_stem):
    """Components of one file's tensors (`ModelLayout::from_tensors` with
    one file, no diffusers group, no unit), in the loader's order."""
    comps = {}  # name -> [kind, prefix, tensors]
    plain = []
    den = "\0denoiser"
    for t in tensors:
        pc = prefixed_component(t.name)
        if pc is None:
            plain.append(t)
            continue
        prefix, name, kind = pc
        name = name or den
        comps.setdefault(name, [kind, prefix, []])[2].append(t)
    if den in comps:
        d = comps.pop(den)
        is_unet = any(
            (t.name[len(d[1]):] if t.name.startswith(d[1]) else t.name).startswith(
                ("input_blocks.", "down_blocks.")
            )
            for t in d[2]
        )
        comps["unet" if is_unet else "transformer"] = d
    if plain:
        name, kind, recognised = classify_unprefixed([t.name for t in plain], file_stem)
        if not (recognised or not comps):
            name = "other"
        if name == "other":
            kind = OTHER
        if name in comps:
            comps[name][2].extend(plain)
        else:
            comps[name] = [kind, "", plain]
    out = [build_component(n, k, p, ts) for n, (k, p, ts) in comps.items()]
    out.sort(key=lambda c: (c.kind, c.name))
    return out


def rust_file_stem(path):
    name = Path(path).name
    if name.startswith(".") and name.count(".") == 1:
        return name
    i = name.rfind(".")
    return name if i <= 0 else name[:i]


def matmul_dims(t):
    """(n, k) of a weight that gets a product in `offload bench e2e`, else None."""
    if t.dtype not in KERNEL_DTYPES or len(t.shape) not in (2, 4) or 0 in t.shape:
        return None
    return (t.shape[0], math.prod(t.shape[1:]))


class Stack:
    """The layer stack of one file, and what a generation computes."""

    def __init__(self, path, tokens, steps):
        self.path = str(path)
        self.tensors, self.meta = read_safetensors_header(path)
        self.components = build_layout(self.tensors, rust_file_stem(path))
        self.te = [i for i, c in enumerate(self.components) if c.kind == TEXT_ENCODER]
        self.denoiser = [i for i, c in enumerate(self.components) if c.kind == DENOISER]
        self.vae = [i for i, c in enumerate(self.components) if c.kind == VAE]
        if not self.denoiser:
            raise InputError(f"{path}: no denoiser component found in its layout")
        self.tokens = tokens
        self.steps = steps
        self.model_bytes = sum(c.nbytes for c in self.components)
        self.denoiser_bytes = sum(self.components[c].nbytes for c in self.denoiser)
        self.largest_layer = max(l.nbytes for c in self.components for l in c.layers)
        dims = [d for t in self.tensors if (d := matmul_dims(t)) is not None]
        self.max_n = max([1] + [n for n, _ in dims])
        self.max_k = max([1] + [k for _, k in dims])
        self.products_per_pass = 0
        self.flops_per_pass = 0
        for c in self.denoiser:
            for l in self.components[c].layers:
                for t in l.tensors:
                    d = matmul_dims(t)
                    if d:
                        self.products_per_pass += 1
                        self.flops_per_pass += 2 * tokens * d[0] * d[1]

    def schedule(self, steps):
        """A generation: (component index, denoiser pass index or None), in order."""
        out = [(c, None) for c in self.te]
        for s in range(steps):
            out += [(c, s) for c in self.denoiser]
        out += [(c, None) for c in self.vae]
        return out

    def describe(self):
        lines = [
            f"model: {self.path}: {self.model_bytes / MIB:.1f} MiB ({self.denoiser_bytes / MIB:.1f} MiB denoiser), "
            f"largest layer {self.largest_layer / MIB:.1f} MiB; {self.steps} steps, {self.tokens} tokens",
            f"  {len(self.tensors)} tensors, {sum(len(c.layers) for c in self.components)} layers in "
            f"{len(self.components)} components; a denoiser pass: {self.products_per_pass} products, "
            f"{self.flops_per_pass / 1e9:.2f} GFLOP",
        ]
        for c in self.components:
            big = max(c.layers, key=lambda l: l.nbytes)
            lines.append(
                f"  {c.name:<16} {KIND_NAMES[c.kind]:<13} {len(c.layers):>4} layers "
                f"{sum(len(l.tensors) for l in c.layers):>5} tensors {c.nbytes / MIB:>8.1f} MiB  "
                f"largest `{big.name}` {big.nbytes / MIB:.2f} MiB"
            )
        return "\n".join(lines)

    def layout_json(self):
        return [
            {
                "name": c.name,
                "kind": KIND_NAMES[c.kind],
                "prefix": c.prefix,
                "layers": [{"name": l.name, "tensors": [t.name for t in l.tensors]} for l in c.layers],
            }
            for c in self.components
        ]


# --------------------------------------------------------------------------
# Offload's own rows
# --------------------------------------------------------------------------


def torch_lib_dirs():
    """Folders of torch's CUDA wheels (site-packages/nvidia/*/lib) that hold
    the libraries Offload loads by name besides the driver's (libnvrtc, libcublas)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        for lib in sorted(Path(root).glob("*/lib")) + sorted(Path(root).glob("*/*/lib")):
            if lib.is_dir() and (any(lib.glob("libnvrtc.so*")) or any(lib.glob("libcublas*.so*"))):
                dirs.append(str(lib))
    return dirs


def run_offload(args, stack, log):
    """Run `offload bench e2e` on the same file; its plain rows (JSON) and its device line."""
    binary = Path(args.offload_bin)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise InputError(f"--offload-bin {args.offload_bin}: not an executable file")
    with tempfile.TemporaryDirectory(prefix="peer-offload-") as tmp:
        out_json = Path(tmp) / "e2e.json"
        cmd = [
            str(binary), "bench", "e2e", "--model", stack.path, "--json", str(out_json),
            "--no-lora", "--steps", str(args.steps), "--tokens", str(args.tokens),
            "--activations", args.activations,
        ] + shlex.split(args.offload_args or "")
        env = dict(os.environ)
        # Where torch's CUDA wheels hold libnvrtc/libcublas, Offload may find them
        # there too; appended, so the caller's LD_LIBRARY_PATH comes first.
        extra = [d for d in torch_lib_dirs() if d not in env.get("LD_LIBRARY_PATH", "").split(":")]
        if extra:
            env["LD_LIBRARY_PATH"] = ":".join(
                [p for p in [env.get("LD_LIBRARY_PATH", "")] if p] + extra
            )
        log(f"== Offload: {' '.join(shlex.quote(c) for c in cmd)}")
        if extra:
            log(f"   (LD_LIBRARY_PATH += torch's wheel libraries: {':'.join(extra)})")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log(p.stdout.rstrip())
        log(f"== Offload: exit {p.returncode} in {time.perf_counter() - t0:.1f} s")
        rows = []
        if out_json.exists():
            for line in out_json.read_text().splitlines():
                if line.strip():
                    rows.append(json.loads(line))
        device_line = next((l for l in p.stdout.splitlines() if l.startswith("device:")), "")
        if p.returncode != 0:
            tail = "\n".join(p.stdout.strip().splitlines()[-5:])
            raise RuntimeError(f"`offload bench e2e` exited {p.returncode}:\n{tail}")
        if not rows:
            raise RuntimeError("`offload bench e2e` wrote no JSON rows")
        plain = [r for r in rows if r.get("lora_mode", "none") == "none"]
        return plain, device_line


# --------------------------------------------------------------------------
# The peers (torch)
# --------------------------------------------------------------------------

PEER_MODES = ("none", "accelerate", "block", "block-packed", "block-sync", "model", "diffusers")


class PeerRun:
    """One peer mode's measurement (or why it has none)."""

    def __init__(self, mode, label, note="", bytes_per_pass=None):
        self.mode = mode
        self.label = label
        self.note = note
        self.bytes_per_pass = bytes_per_pass
        self.it_per_s = None
        self.generation_s = None
        self.first_pass_s = None
        self.later_pass_s = None
        self.peak_device = None
        self.setup_s = None
        self.error = None

    def as_json(self):
        return {
            "source": "pytorch",
            "mode": self.mode,
            "label": self.label,
            "it_per_s": self.it_per_s,
            "generation_s": self.generation_s,
            "first_pass_s": self.first_pass_s,
            "later_pass_s": self.later_pass_s,
            "peak_device_bytes": self.peak_device,
            "bytes_h2d_per_pass": self.bytes_per_pass,
            "setup_s": self.setup_s,
            "error": self.error,
            "note": self.note,
        }


def run_peers(args, stack, log):
    """Time the peer modes on `stack`; returns (rows, info)."""
    import torch
    from torch import nn

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise InputError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise InputError(f"--device {args.device}: cuda or cpu")
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import accelerate

        versions["accelerate"] = accelerate.__version__
    except ImportError:
        accelerate = None
    diffusers_error = None
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except Exception as e:  # not installed, or installed but broken
        diffusers = None
        if not isinstance(e, ModuleNotFoundError):
            diffusers_error = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if cuda:
        p = torch.cuda.get_device_properties(dev)
        gpu = f"{p.name} ({p.total_memory / (1 << 30):.0f} GiB), torch CUDA {torch.version.cuda}"
    else:
        gpu = "CPU (--device cpu: a check of the script, not a benchmark)"
    env_line = f"{gpu}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
    log(f"peers: {env_line}")
    if accelerate is None:
        log("   accelerate is not installed: its rows are skipped")
    if diffusers is None:
        log("   diffusers is not installed" + (f" (import failed: {diffusers_error})" if diffusers_error else "")
            + ": the block rows are our re-implementation of its group offloading")
    else:
        log(f"   diffusers {diffusers.__version__}: its apply_group_offloading runs as the `diffusers` row")

    TD = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }

    # Host copies of every tensor, read from the file (pageable memory).
    t0 = time.perf_counter()
    host = {}
    with open(stack.path, "rb") as f:
        for t in stack.tensors:
            td = TD[t.dtype]
            if td is None:
                raise InputError(f"tensor `{t.name}`: this torch has no {t.dtype}")
            if t.nbytes == 0:
                host[t.name] = torch.empty(t.shape, dtype=td)
                continue
            f.seek(t.offset)
            buf = bytearray(f.read(t.nbytes))
            if len(buf) != t.nbytes:
                raise InputError(f"{stack.path}: truncated at tensor `{t.name}`")
            # clone(): torch's own (aligned) allocation, not the bytearray's.
            host[t.name] = torch.frombuffer(buf, dtype=td).reshape(t.shape).clone()
            del buf
    log(f"   read {stack.model_bytes / MIB:.1f} MiB into host memory in {time.perf_counter() - t0:.1f} s")

    tokens = stack.tokens
    # The activations Offload's benchmark writes: x[i] = ((i mod 97) - 48) * 1e-3, f32.
    x = ((torch.arange(tokens * stack.max_k, dtype=torch.int64) % 97).to(torch.float32) - 48.0) * 1e-3
    x = x.to(dev)
    y = torch.empty(tokens * stack.max_n, dtype=torch.float32, device=dev)
    scratch_bytes = (x.numel() + y.numel()) * 4

    # The product as Offload's cuBLAS path computes it: X converted to W's
    # dtype, one GEMM with f32 accumulation and f32 output into Y. The first
    # form this torch runs on this device is used.
    def mm_out_dtype(xk, w2, yv):
        torch.mm(xk, w2.t(), out_dtype=torch.float32, out=yv)

    def mm_out_dtype_copy(xk, w2, yv):
        yv.copy_(torch.mm(xk, w2.t(), out_dtype=torch.float32))

    def mm_same_dtype(xk, w2, yv):
        yv.copy_(torch.mm(xk, w2.t()))

    def mm_widened(xk, w2, yv):
        torch.mm(xk.float(), w2.float().t(), out=yv)

    forms = [
        ("torch.mm(x in W's dtype, W^T, out_dtype=float32, out=Y)", mm_out_dtype),
        ("torch.mm(x in W's dtype, W^T, out_dtype=float32), copied into Y", mm_out_dtype_copy),
        ("torch.mm(x in W's dtype, W^T) in W's dtype, copied into Y", mm_same_dtype),
        ("torch.mm in f32 (x and W widened), out=Y", mm_widened),
    ]
    mm, mm_desc = None, None
    for desc, fn in forms:
        try:
            wp = torch.zeros(4, 8, dtype=torch.float16, device=dev)
            fn(x[: tokens * 8].view(tokens, 8).to(torch.float16), wp, y[: tokens * 4].view(tokens, 4))
            if cuda:
                torch.cuda.synchronize(dev)
            mm, mm_desc = fn, desc
            break
        except (RuntimeError, TypeError, NotImplementedError):
            continue
    if mm is None:
        raise RuntimeError("no form of torch.mm ran on this device")
    # --activations weights: X held in each 16-bit weight dtype, converted once here.
    x_held = {}
    if args.activations == "weights":
        x_held = {torch.float16: x.to(torch.float16), torch.bfloat16: x.to(torch.bfloat16)}
        scratch_bytes += sum(v.numel() * v.element_size() for v in x_held.values())
        log(f"   product per weight: x[:tokens*k] as [{tokens}, k], held in W's dtype; {mm_desc}")
    else:
        log(f"   product per weight: x[:tokens*k] as [{tokens}, k], f32 -> W's dtype; {mm_desc}")
    # What torch holds before any weight (activations, cuBLAS workspace): the
    # peaks below are over this, so that they count weights as Offload's do.
    base_bytes = 0
    if cuda:
        torch.cuda.synchronize(dev)
        base_bytes = torch.cuda.memory_allocated(dev)

    def compute(ws, prods):
        for i, n, k in prods:
            w = ws[i]
            xk = x[: tokens * k].view(tokens, k)
            yv = y[: tokens * n].view(tokens, n)
            if w.dtype == torch.float32:
                torch.mm(xk, w.view(n, k).t(), out=yv)  # an f32 weight: all f32, as Offload
            elif w.dtype in x_held:
                mm(x_held[w.dtype][: tokens * k].view(tokens, k), w.view(n, k), yv)
            else:
                mm(xk.to(w.dtype), w.view(n, k), yv)

    # Per component: its layers, each with its products (tensor index, n, k).
    by_comp = {}
    for ci, c in enumerate(stack.components):
        ents = []
        for l in c.layers:
            prods = [(i,) + d for i, t in enumerate(l.tensors) for d in [matmul_dims(t)] if d is not None]
            ents.append((l, prods))
        by_comp[ci] = ents

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    class Marks:
        """Pass boundaries in compute-stream order: CUDA events on the
        current stream (as Offload marks them with host functions on its
        compute stream), host times on the CPU."""

        def __init__(self):
            self.marks = []

        def mark(self):
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                self.marks.append(e)
            else:
                self.marks.append(time.perf_counter())

        def passes(self):
            if cuda:
                return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    class Runner:
        """A peer: begin(steps), component(ci) in generation order, end(), close()."""

        def begin(self, steps):
            pass

        def end(self):
            pass

        def close(self):
            pass

    def generation(runner, steps):
        """One generation, as `offload bench e2e` runs it: text encoders once,
        the denoiser `steps` times, the VAE once; marks around the passes."""
        marks = Marks()
        runner.begin(steps)
        for c in stack.te:
            runner.component(c)
        for _ in range(steps):
            marks.mark()
            for c in stack.denoiser:
                runner.component(c)
        marks.mark()
        for c in stack.vae:
            runner.component(c)
        runner.end()
        return marks

    # --- none: every weight on the device.
    class NoneRunner(Runner):
        def __init__(self):
            self.comps = {
                ci: [([host[t.name].to(dev) for t in l.tensors], prods) for l, prods in ents]
                for ci, ents in by_comp.items()
            }

        def component(self, ci):
            for ws, prods in self.comps[ci]:
                compute(ws, prods)

        def close(self):
            self.comps = None

    # --- nn.Modules for accelerate and diffusers: one module per Offload
    # layer, its tensors as parameters t0, t1, ... in layout order; forward
    # runs the layer's products.
    class LayerModule(nn.Module):
        def __init__(self, layer, prods):
            super().__init__()
            self.pnames = [f"t{i}" for i in range(len(layer.tensors))]
            for pn, t in zip(self.pnames, layer.tensors):
                self.register_parameter(pn, nn.Parameter(host[t.name], requires_grad=False))
            self.prods = prods

        def forward(self, xin):
            compute([self._parameters[p] for p in self.pnames], self.prods)
            return xin

    class ComponentModule(nn.Module):
        def __init__(self, ents):
            super().__init__()
            self.layers = nn.ModuleList([LayerModule(l, prods) for l, prods in ents])

        def forward(self, xin):
            for m in self.layers:
                xin = m(xin)
            return xin

    class ModuleRunner(Runner):
        def __init__(self):
            self.root = nn.ModuleDict({f"c{ci}": ComponentModule(ents) for ci, ents in by_comp.items()})

        def component(self, ci):
            self.root[f"c{ci}"](x)

        def close(self):
            self.root = None

    class AccelerateRunner(ModuleRunner):
        """accelerate.cpu_offload on the whole stack: a hook per layer module
        copies its weights from the (pageable) host state dict to the device
        before its forward and drops them after."""

        def __init__(self):
            super().__init__()
            accelerate.cpu_offload(self.root, execution_device=dev)

    class ModelOffloadRunner(ModuleRunner):
        """accelerate.cpu_offload_with_hook chained over the components in
        execution order (diffusers' enable_model_cpu_offload): a component
        moves to the device at its first call and the previous one back to
        the host; the last one goes back at the end of the generation (as a
        pipeline's maybe_free_model_hooks)."""

        def __init__(self):
            super().__init__()
            hook = None
            for ci in stack.te + stack.denoiser + stack.vae:
                _, hook = accelerate.cpu_offload_with_hook(self.root[f"c{ci}"], dev, prev_module_hook=hook)
            self.last = hook

        def end(self):
            if self.last is not None:
                self.last.offload()

    class DiffusersRunner(ModuleRunner):
        """diffusers' own group offloading, block level, one block per group."""

        def __init__(self):
            super().__init__()
            from diffusers.hooks import apply_group_offloading

            for ci in by_comp:
                apply_group_offloading(
                    self.root[f"c{ci}"], onload_device=dev, offload_device=torch.device("cpu"),
                    offload_type="block_level", num_blocks_per_group=1, use_stream=cuda,
                )

    class BlockRunner(Runner):
        """Blocks = Offload's layers, each with pinned host copies of its tensors."""

        def __init__(self):
            self.blocks = {
                ci: [([host[t.name].pin_memory() if cuda else host[t.name] for t in l.tensors], prods)
                     for l, prods in ents]
                for ci, ents in by_comp.items()
            }
            self.side = torch.cuda.Stream(dev) if cuda else None

        def close(self):
            self.blocks = None

    class BlockEventsRunner(BlockRunner):
        """One block ahead, across component and pass boundaries, hand-offs
        by events, no host wait on a copy. For block i: the compute stream
        waits for i's ready event and runs i (then records i's done event);
        the host waits for block i-1's done event, drops i-1's device copy
        and queues i+1's copy on the side stream, which so overlaps i's
        compute. At most blocks i-1, i, i+1 are on the device at once, i-1
        only until its compute is done."""

        def begin(self, steps):
            self.seq = []
            for ci in stack.te + stack.denoiser * steps + stack.vae:
                self.seq.extend(self.blocks[ci])
            self.i = 0
            self.ahead = None  # (device tensors, ready event) of block i
            self.prev = None  # (device tensors, done event) of block i-1

        def fetch(self, b):
            pinned = b[0]
            if not cuda:
                return [p.clone() for p in pinned], None
            with torch.cuda.stream(self.side):
                ws = [p.to(dev, non_blocking=True) for p in pinned]
                ready = torch.cuda.Event()
                ready.record(self.side)
            return ws, ready

        def component(self, ci):
            for b in self.blocks[ci]:
                if self.seq[self.i] is not b:
                    raise RuntimeError("block order differs from the generation's schedule")
                ws, ready = self.ahead if self.ahead is not None else self.fetch(b)
                self.ahead = None
                done = None
                if cuda:
                    torch.cuda.current_stream(dev).wait_event(ready)
                compute(ws, b[1])
                if cuda:
                    done = torch.cuda.Event()
                    done.record()
                if self.prev is not None:
                    if self.prev[1] is not None:
                        self.prev[1].synchronize()
                    self.prev = None  # i-1's device copy goes back to the allocator
                if self.i + 1 < len(self.seq):
                    self.ahead = self.fetch(self.seq[self.i + 1])
                self.prev = (ws, done)
                del ws
                self.i += 1

        def end(self):
            self.prev = None
            self.ahead = None

    class BlockPackedRunner(BlockEventsRunner):
        """As BlockEventsRunner, with each block's tensors packed into one
        pinned buffer (256-byte aligned offsets) and copied with one copy per
        block, the device tensors being views of the block's device buffer:
        a stronger peer than diffusers' per-tensor copies (Offload's pinned
        host policy also lays each layer out in one buffer)."""

        def __init__(self):
            self.side = torch.cuda.Stream(dev) if cuda else None
            self.blocks = {}
            for ci, ents in by_comp.items():
                bl = []
                for l, prods in ents:
                    metas, total = [], 0
                    for t in l.tensors:
                        total = -(-total // 256) * 256
                        metas.append((total, t.nbytes, host[t.name].dtype, host[t.name].shape))
                        total += t.nbytes
                    buf = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=cuda)
                    for (off, nb, _, _), t in zip(metas, l.tensors):
                        if nb:
                            buf[off:off + nb].copy_(host[t.name].reshape(-1).view(torch.uint8))
                    bl.append(((buf, metas), prods))
                self.blocks[ci] = bl

        def fetch(self, b):
            buf, metas = b[0]
            if cuda:
                with torch.cuda.stream(self.side):
                    d = buf.to(dev, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(self.side)
            else:
                d, ready = buf.clone(), None
            return [d[off:off + nb].view(dt).view(shape) for off, nb, dt, shape in metas], ready

    class BlockSyncRunner(BlockRunner):
        """As diffusers' group offloading hooks with use_stream=True and
        record_stream=False (its default): a group's onload first waits for
        the side stream (host), then queues the group's copies on it; the
        first group of a module onloads itself and then the next one, each
        later group the one after it; after a group's forward its offload
        waits for the compute stream (host) and drops the device copy. The
        chain ends at the module's last group: no prefetch into the next
        component or the next pass."""

        def onload(self, b):
            pinned = b[0]
            if not cuda:
                return [p.clone() for p in pinned]
            self.side.synchronize()
            with torch.cuda.stream(self.side):
                return [p.to(dev, non_blocking=True) for p in pinned]

        def component(self, ci):
            bl = self.blocks[ci]
            nxt = None
            for j, b in enumerate(bl):
                ws = self.onload(b) if j == 0 else nxt
                if j + 1 < len(bl):
                    nxt = self.onload(bl[j + 1])  # waits for this group's copy first
                elif cuda:
                    self.side.synchronize()
                compute(ws, b[1])
                if cuda:
                    torch.cuda.current_stream(dev).synchronize()
                del ws

    def measure(mode, label, make, note="", bytes_per_pass=None):
        r = PeerRun(mode, label, note, bytes_per_pass)
        runner = None
        try:
            t0 = time.perf_counter()
            runner = make()
            sync()
            r.setup_s = time.perf_counter() - t0
            # Warm-up, not timed: a whole generation with one denoiser step
            # (cuBLAS handles, the caching allocator, accelerate's hooks).
            generation(runner, 1)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            marks = generation(runner, stack.steps)
            sync()
            r.generation_s = time.perf_counter() - t0
            r.it_per_s = stack.steps / r.generation_s
            passes = marks.passes()
            if len(passes) != stack.steps:
                raise RuntimeError(f"{len(passes)} pass marks for {stack.steps} steps")
            r.first_pass_s = passes[0]
            rest = passes[1:] or passes
            r.later_pass_s = sum(rest) / len(rest)
            if cuda:
                r.peak_device = torch.cuda.max_memory_allocated(dev) - base_bytes
        except Exception as e:  # a peer that breaks is a row with its error; the others still run
            r.error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            log(f"   {label}: FAILED: {r.error}")
        finally:
            if runner is not None:
                try:
                    runner.close()
                except Exception as e:
                    log(f"   {label}: close failed: {type(e).__name__}: {e}")
            runner = None
            try:
                sync()
                if cuda:
                    torch.cuda.empty_cache()
            except Exception as e:
                if r.error is None:
                    r.error = f"after the run: {type(e).__name__}: {e}"
        if r.error is None:
            log(
                f"   {label}: {r.it_per_s:.2f} it/s, later pass {r.later_pass_s * 1e3:.2f} ms"
                + (f", peak {r.peak_device / MIB:.1f} MiB" if r.peak_device is not None else "")
                + f" (setup {r.setup_s:.1f} s)"
            )
        return r

    def skipped(mode, label, why):
        r = PeerRun(mode, label)
        r.error = why
        log(f"   {label}: skipped: {why}")
        return r

    D = stack.denoiser_bytes
    rows = []
    with torch.no_grad():
        for mode in args.modes:
            if mode == "none":
                rows.append(measure("none", "none (all weights on the device)", NoneRunner,
                                    "every weight resident", 0))
            elif mode == "accelerate":
                label = "accelerate cpu_offload (sequential)"
                if accelerate is None:
                    rows.append(skipped(mode, label, "accelerate is not installed"))
                else:
                    rows.append(measure(mode, label, AccelerateRunner,
                                        "per-layer hooks, pageable host copies, copies on the compute stream", D))
            elif mode == "block":
                rows.append(measure(
                    mode, "block offload + prefetch, events (re-implementation)", BlockEventsRunner,
                    "pinned host copies, side-stream copy of block i+1 during block i, event hand-offs", D))
            elif mode == "block-packed":
                rows.append(measure(
                    mode, "block offload + prefetch, events, one copy per block (ours)", BlockPackedRunner,
                    "as block, each block packed in one pinned buffer: one copy per block, not per tensor", D))
            elif mode == "block-sync":
                rows.append(measure(
                    mode, "block offload + prefetch, diffusers-style sync (re-implementation)", BlockSyncRunner,
                    "as diffusers' group offloading with record_stream=False: host waits per block", D))
            elif mode == "model":
                label = "model offload (accelerate cpu_offload_with_hook)"
                if accelerate is None:
                    rows.append(skipped(mode, label, "accelerate is not installed"))
                else:
                    rows.append(measure(mode, label, ModelOffloadRunner,
                                        "whole components moved; no device budget", 0))
            elif mode == "diffusers":
                label = "diffusers apply_group_offloading (block_level, use_stream)"
                if diffusers is None:
                    if args.modes_given:
                        rows.append(skipped(mode, label, "diffusers is not installed"))
                else:
                    rows.append(measure(
                        mode, f"diffusers {diffusers.__version__} apply_group_offloading "
                        f"(block_level, use_stream={cuda})", DiffusersRunner, "diffusers' own code", D))
    info = {
        "env": env_line,
        "versions": versions,
        "device": gpu,
        "product": mm_desc,
        "scratch_bytes": scratch_bytes,
        "base_bytes": base_bytes,
    }
    return rows, info


# --------------------------------------------------------------------------
# The combined table and the verdict
# --------------------------------------------------------------------------


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def offload_label(r):
    mode, policy = r.get("mode", "?"), r.get("policy", "")
    if r.get("reference"):
        return f"{mode}* (reference)"
    return f"{mode} {policy}" if mode in ("balanced", "sequential") else mode


def find_offload(rows, mode, policy=None):
    for r in rows:
        if r.get("mode") == mode and (policy is None or r.get("policy") == policy) and not r.get("reference"):
            return r
    return None


def find_peer(rows, mode):
    return next((r for r in rows if r.mode == mode), None)


def ratio_line(what, a_label, a, b_label, b):
    """One verdict line: a faster than b?"""
    if a is None or b is None:
        missing = a_label if a is None else b_label
        return None, f"- {what}: no figure ({missing} did not run)"
    faster = a > b
    return faster, (
        f"- {what}: {a_label} {a:.2f} it/s vs {b_label} {b:.2f} it/s: "
        f"{a / b:.2f}x, {'faster' if faster else 'NOT faster'}"
    )


def report(stack, args, peers, info, offload_rows, offload_device, offload_error):
    lines = []
    gpu = info.get("device", "?") if info else "?"
    lines.append(f"# PyTorch peers beside `offload bench e2e`: {gpu}")
    lines.append("")
    lines.append(f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, host {os.uname().nodename}")
    if info:
        lines.append(f"- peers: {info['env']}")
        lines.append(f"- peers' product per weight: {info['product']}; activation scratch "
                     f"{info['scratch_bytes'] / MIB:.2f} MiB; torch held {info['base_bytes'] / MIB:.1f} MiB "
                     "before any weight (scratch, cuBLAS workspace), left out of the peers' peaks")
        if "diffusers" not in info["versions"]:
            lines.append("- diffusers is not installed: the block rows are our re-implementation of its "
                         "group offloading (bench/peers/README.md)")
    if offload_device:
        lines.append(f"- Offload: {offload_device}")
    first = stack.describe().splitlines()[0]
    lines.append(f"- {first}")
    lines.append(f"- it/s = {stack.steps} denoiser steps / the whole generation (text encoders once, "
                 f"denoiser {stack.steps}x, VAE once); pass ms = mean denoiser pass after the first, "
                 "on the compute stream; peers after one untimed warm-up generation")
    budget = next((r for r in offload_rows if not r.get("reference")), None)
    if budget:
        dm = budget.get("device_mem_bytes")
        if dm:
            lines.append(f"- Offload's offload modes get {dm / MIB:.1f} MiB of device memory "
                         f"({dm / stack.model_bytes:.2f} of the model); the peers have no budget")
    lines.append("")
    lines.append("| source | mode | it/s | × own none | pass ms | +ms/pass | MB/pass | peak dev MiB | note |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---|")

    def row(source, label, it_s, none_it_s, pass_s, none_pass_s, bytes_pass, peak, note):
        rel = it_s / none_it_s if none_it_s else None
        ms = pass_s * 1e3 if pass_s is not None else None
        extra = (pass_s - none_pass_s) * 1e3 if pass_s is not None and none_pass_s is not None else None
        mb = bytes_pass / 1e6 if bytes_pass is not None else None
        mib = peak / MIB if peak is not None else None
        lines.append(
            f"| {source} | {label} | {it_s:.2f} | {fmt(rel, '.2f')} | {fmt(ms, '.2f')} | {fmt(extra, '+.2f')} | "
            f"{fmt(mb, '.1f')} | {fmt(mib, '.1f')} | {note} |"
        )

    def failed(source, label, why):
        lines.append(f"| {source} | {label} | {why} | | | | | | |")

    pnone = find_peer(peers, "none")
    if pnone is not None and pnone.error is not None:
        pnone = None
    for r in peers:
        if r.error is not None:
            failed("PyTorch", r.label, r.error)
        else:
            row("PyTorch", r.label, r.it_per_s, pnone and pnone.it_per_s, r.later_pass_s,
                pnone and pnone.later_pass_s, r.bytes_per_pass, r.peak_device, r.note)
    if offload_error:
        failed("Offload", "-", offload_error.splitlines()[0])
    onone = next((r for r in offload_rows if r.get("reference") and r.get("it_per_s") is not None), None)
    for r in offload_rows:
        label = offload_label(r)
        if not r.get("fits", True) or r.get("it_per_s") is None:
            failed("Offload", label, r.get("error") or "no figure")
            continue
        if r.get("reference"):
            note = "whole model resident"
        else:
            dm = r.get("device_mem_bytes")
            note = f"budget {dm / MIB:.1f} MiB" if dm else ""
        row("Offload", label, r["it_per_s"], onone and onone["it_per_s"], r.get("later_pass_s"),
            onone and onone.get("later_pass_s"), r.get("bytes_h2d_per_pass"), r.get("peak_device_bytes"), note)
    lines.append("")
    lines.append("Peaks: the peers' are torch.cuda.max_memory_allocated over the timed generation less "
                 "what torch held before any weight (so: weights and per-product temporaries); Offload's "
                 "are its arena's weight pages (peak_device_bytes), whole pages. MB/pass: host-to-device "
                 "bytes of a later denoiser pass (the peers': by construction). +ms/pass: pass ms less "
                 "the pass ms of the same source's none row, the cost of offloading itself.")
    lines.append("")
    verdict_lines, met = verdicts(peers, offload_rows)
    lines.append("Target: Offload's sequential and balanced modes faster than the PyTorch peers' equivalents.")
    lines.extend(verdict_lines)
    lines.append("")
    summary = verdict_summary(peers, offload_rows, met)
    lines.append(f"verdict: {summary}")
    return "\n".join(lines) + "\n", summary


def its(r):
    if r is None:
        return None
    if isinstance(r, dict):
        return r.get("it_per_s") if r.get("fits", True) else None
    return r.it_per_s if r.error is None else None


def verdicts(peers, offload_rows):
    """Offload sequential against the peers that stream every layer (accelerate's
    cpu_offload, the block peers); Offload balanced against the block peers
    (group offloading and ours). Peers that did not run give no line."""
    seq = find_offload(offload_rows, "sequential", "planned") or find_offload(offload_rows, "sequential")
    bal = find_offload(offload_rows, "balanced", "planned") or find_offload(offload_rows, "balanced")
    names = {
        "accelerate": "accelerate cpu_offload",
        "block": "block offload + prefetch (events)",
        "block-packed": "block offload + prefetch, one copy per block",
        "block-sync": "block offload + prefetch, diffusers-style sync",
        "diffusers": "diffusers' group offloading",
    }
    checks = []
    for ours, row, modes in (
        ("sequential", seq, ("accelerate", "block", "block-packed")),
        ("balanced", bal, ("block", "block-packed", "block-sync", "diffusers")),
    ):
        for m in modes:
            peer = find_peer(peers, m)
            if peer is None:
                continue
            checks.append((f"Offload {ours} vs {names[m]}", f"Offload {ours}", its(row), m, its(peer)))
    lines = []
    met = []
    for what, al, a, bl, b in checks:
        ok, line = ratio_line(what, al, a, bl, b)
        lines.append(line)
        met.append(ok)
    return lines, met


def verdict_summary(peers, offload_rows, met):
    if not offload_rows:
        return "no Offload rows (run with --offload-bin)"
    if any(m is None for m in met):
        return f"incomplete: {sum(1 for m in met if m)} of {len(met)} comparisons faster, {sum(1 for m in met if m is None)} without figures"
    n = sum(1 for m in met if m)
    return ("target met" if n == len(met) else "target NOT met") + f": Offload faster in {n} of {len(met)} comparisons"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="PyTorch peers (no offload, accelerate cpu_offload, block offload with prefetch, "
        "model offload) of `offload bench e2e`, on the same layer stack, beside Offload's rows.",
        epilog="See bench/peers/README.md.",
    )
    ap.add_argument("--model", required=True, help="a .safetensors file (`offload synth sdxl --scale 4 -o DIR`)")
    ap.add_argument("--steps", type=int, default=20, help="denoiser steps per generation (default 20, as e2e)")
    ap.add_argument("--tokens", type=int, default=16, help="rows of the activation batch (default 16, as e2e)")
    ap.add_argument("--activations", choices=["weights", "f32"], default="weights",
                    help="activations held in each weight's dtype (default, as `offload bench e2e`) "
                         "or f32 converted before every product; passed on to `offload bench e2e`")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script only)")
    ap.add_argument("--modes", default=None,
                    help=f"peer modes, comma-separated (default: all that can run): {', '.join(PEER_MODES)}")
    ap.add_argument("--offload-bin", help="the `offload` binary: run its `bench e2e` on the same file first")
    ap.add_argument("--offload-args", default="", help="more arguments for `offload bench e2e` (one string)")
    ap.add_argument("--out", help="write the combined markdown table here")
    ap.add_argument("--json", help="write every row (peers and Offload) as JSON lines here")
    ap.add_argument("--dry-run", action="store_true", help="no torch: read the file, print the stack and exit")
    ap.add_argument("--dump-layout", help="write the layout (components, layers, tensor names) as JSON here")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.tokens < 1:
        ap.error("--steps and --tokens must be at least 1")
    a.modes_given = a.modes is not None
    modes = [m.strip() for m in (a.modes or ",".join(PEER_MODES)).split(",") if m.strip()]
    bad = [m for m in modes if m not in PEER_MODES]
    if bad:
        ap.error(f"--modes: unknown {', '.join(bad)} (choose from {', '.join(PEER_MODES)})")
    a.modes = list(dict.fromkeys(modes))
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def log(s):
        print(s, flush=True)

    try:
        stack = Stack(args.model, args.tokens, args.steps)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(stack.describe())
    if args.dump_layout:
        Path(args.dump_layout).write_text(json.dumps(stack.layout_json(), indent=1) + "\n")
        log(f"layout written to {args.dump_layout}")
    if args.dry_run:
        return 0

    # torch first: a machine that cannot run the peers fails before Offload's run.
    try:
        import torch
    except ImportError:
        print("error: torch is not installed (use --dry-run to check the file and the layout without it)",
              file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2

    failed = False
    offload_rows, offload_device, offload_error = [], "", None
    if args.offload_bin:
        try:
            offload_rows, offload_device = run_offload(args, stack, log)
            # The JSON's device field is "Cuda: NAME" on a GPU, "Host: ..." otherwise.
            dev_field = str(offload_rows[0].get("device", "")) if offload_rows else ""
            if args.device.startswith("cuda") and not dev_field.startswith("Cuda"):
                log(f"warning: Offload did not run on CUDA ({dev_field or offload_device}): its rows are not comparable")
                offload_device += f" (device field `{dev_field}`: NOT the GPU, not comparable)"
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError, ValueError) as e:
            offload_error = str(e)
            log(f"Offload: FAILED: {e}")
            failed = True

    try:
        peers, info = run_peers(args, stack, log)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(r.error is not None and "not installed" not in r.error for r in peers):
        failed = True

    text, summary = report(stack, args, peers, info, offload_rows, offload_device, offload_error)
    log("")
    log(text.rstrip())
    if args.out:
        Path(args.out).write_text(text)
        log(f"table written to {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            for r in peers:
                f.write(json.dumps(r.as_json()) + "\n")
            for r in offload_rows:
                f.write(json.dumps(dict(r, source="offload")) + "\n")
        log(f"rows written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
