"""A DMS training delta: what training changed in the base, stored small, merged at build time.

Format 1 (rows only): per changed base tensor NAME, ``NAME@rows`` (int64 row indices along dim 0)
and ``NAME@values`` (those rows, in the base dtype when it is 16-bit, else bf16).
Format 2 (LoRA): also ``NAME@lora_A`` [r, in] and ``NAME@lora_B`` [out, r] in bf16 and the
metadata ``lora_scale``; building computes base + scale * B @ A in fp32, casts it to the base
dtype, then writes the rows (which win over the merged values).
The header metadata carries the DMS fields the checkpoint gets and a SHA-256 of the base rows
(format 1) or whole base tensors (format 2) the delta changes, so a delta applied to the wrong
base is refused rather than silently mixed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

FORMAT = "vllm_dms.delta/1"
FORMAT_LORA = "vllm_dms.delta/2"
ROWS, VALUES = "@rows", "@values"
LORA_A, LORA_B = "@lora_A", "@lora_B"
MAX_LORA_BYTES = 10_000_000  # the package ships this file: 10 MB at most
MAX_BYTES = 20 * 1024 * 1024
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def weight_map(base_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file name (sharded index or a single model.safetensors)."""
    index = os.path.join(base_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    from safetensors import safe_open
    with safe_open(os.path.join(base_dir, SINGLE), "pt") as f:
        return {k: SINGLE for k in f.keys()}


def _read(base_dir: str, shard: str, name: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(os.path.join(base_dir, shard), "pt") as f:
        return f.get_tensor(name)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)  # a 1-D bias becomes [N, 1]: one "row" per element


def _fingerprint(rows_by_name: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(rows_by_name):
        h.update(name.encode())
        h.update(rows_by_name[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_delta(base_dir: str, trained_state: dict[str, torch.Tensor], path: str,
               dms_fields: dict, *, max_bytes: int = MAX_BYTES) -> dict:
    """Write the rows of trained_state that differ from base_dir's tensors (after the cast to
    the stored dtype) to path. Returns {"bytes", "tensors", "rows"}."""
    from safetensors.torch import save_file
    wm = weight_map(base_dir)
    out, base_rows, nbytes, nrows = {}, {}, 0, 0
    for name in sorted(trained_state):
        if name not in wm:
            raise KeyError(f"save_delta: {name} is not a tensor of {base_dir}")
        base = _read(base_dir, wm[name], name)
        store = base.dtype if base.element_size() == 2 else torch.bfloat16
        new = trained_state[name].detach().to("cpu", store)
        if new.shape != base.shape:
            raise ValueError(f"save_delta: {name} has shape {tuple(new.shape)}, "
                             f"base has {tuple(base.shape)}")
        changed = (_as_rows(new) != _as_rows(base.to(store))).any(dim=1).nonzero().flatten()
        if changed.numel() == 0:
            continue
        out[name + ROWS] = changed.to(torch.int64)
        out[name + VALUES] = new[changed].contiguous()
        base_rows[name] = base[changed]
        nbytes += out[name + VALUES].nbytes + out[name + ROWS].nbytes
        nrows += changed.numel()
    if nbytes > max_bytes:
        raise ValueError(f"save_delta: {nbytes} bytes of changed rows exceed {max_bytes}")
    meta = {"format": FORMAT, "dms_fields": json.dumps(dms_fields, sort_keys=True),
            "base_name": os.path.basename(os.path.abspath(base_dir)),
            "base_rows_sha256": _fingerprint(base_rows)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(out, tmp, metadata=meta)
    os.replace(tmp, path)
    return {"bytes": os.path.getsize(path), "tensors": len(base_rows), "rows": nrows}


def load_delta(path: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, dict]:
    """-> ({name: (rows, values)}, dms_fields, header metadata); see load_lora for factors."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in (FORMAT, FORMAT_LORA):
            raise ValueError(f"{path}: not a {FORMAT} / {FORMAT_LORA} file "
                             f"(format={meta.get('format')!r})")
        names = sorted(k[:-len(ROWS)] for k in f.keys() if k.endswith(ROWS))
        patches = {n: (f.get_tensor(n + ROWS), f.get_tensor(n + VALUES)) for n in names}
    return patches, json.loads(meta["dms_fields"]), meta


def load_lora(path: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """-> ({name: (A, B)}, scale) of a format-2 delta ({} and 0.0 for format 1)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        names = sorted(k[:-len(LORA_A)] for k in f.keys() if k.endswith(LORA_A))
        factors = {n: (f.get_tensor(n + LORA_A), f.get_tensor(n + LORA_B)) for n in names}
    return factors, float(meta.get("lora_scale", 0.0))


def merge_lora(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The one merge rule (build and tests): base + scale * B @ A in fp32, in base's dtype."""
    return (base.float() + scale * (b.float() @ a.float())).to(base.dtype)


def _whole_fingerprint(base_dir: str, names) -> str:
    wm = weight_map(base_dir)
    return _fingerprint({n: _read(base_dir, wm[n], n) for n in sorted(names)})


def save_lora_delta(base_dir: str, factors: dict, scale: float, rows: dict, path: str,
                    dms_fields: dict, *, max_bytes: int = MAX_LORA_BYTES) -> dict:
    """Write a format-2 delta: factors {name: (A, B)} (stored bf16), rows {name: (idx, values)}
    (stored in the base dtype). Returns {"bytes", "tensors", "rows", "rank"}."""
    from safetensors.torch import save_file
    wm = weight_map(base_dir)
    out, nrows = {}, 0
    for name, (a, b) in sorted(factors.items()):
        if name not in wm:
            raise KeyError(f"save_lora_delta: {name} is not a tensor of {base_dir}")
        out[name + LORA_A] = a.detach().to("cpu", torch.bfloat16).contiguous()
        out[name + LORA_B] = b.detach().to("cpu", torch.bfloat16).contiguous()
    for name, (idx, vals) in sorted(rows.items()):
        base = _read(base_dir, wm[name], name)
        store = base.dtype if base.element_size() == 2 else torch.bfloat16
        out[name + ROWS] = idx.to("cpu", torch.int64).clone()  # rows share one index tensor
        out[name + VALUES] = vals.detach().to("cpu", store).reshape(
            (idx.numel(),) + tuple(base.shape[1:])).contiguous()
        nrows += idx.numel()
    touched = set(factors) | set(rows)
    meta = {"format": FORMAT_LORA, "dms_fields": json.dumps(dms_fields, sort_keys=True),
            "lora_scale": repr(float(scale)),
            "base_name": os.path.basename(os.path.abspath(base_dir)),
            "base_rows_sha256": _whole_fingerprint(base_dir, touched)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(out, tmp, metadata=meta)
    size = os.path.getsize(tmp)
    if size > max_bytes:
        os.remove(tmp)
        raise ValueError(f"save_lora_delta: {size} bytes exceed {max_bytes} (lower the rank)")
    os.replace(tmp, path)
    rank = next(iter(factors.values()))[0].shape[0] if factors else 0
    return {"bytes": size, "tensors": len(touched), "rows": nrows, "rank": rank}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_from_delta(delta_path: str, out_dir: str, base_dir: str | None = None) -> str:
    """Rebuild the full DMS checkpoint (base + delta rows + dms_* config fields) into out_dir.

    base_dir defaults to smollm2_base(). Idempotent: a finished out_dir whose mark names this
    delta's SHA-256 is returned untouched; anything else is rebuilt in a side folder and swapped
    in. Unchanged shards are hard links to the base (never written through).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vllm_dms.tools.checkpoints import COMPLETE_MARK, add_dms_fields, smollm2_base
    out_dir = os.path.abspath(out_dir)
    sha = file_sha256(delta_path)
    mark = os.path.join(out_dir, COMPLETE_MARK)
    if os.path.isfile(mark):
        with open(mark) as f:
            if f.read().strip() == sha:
                return out_dir
    base_dir = os.path.abspath(base_dir or smollm2_base())
    patches, fields, meta = load_delta(delta_path)
    factors, scale = load_lora(delta_path)
    lora = meta.get("format") == FORMAT_LORA
    wm = weight_map(base_dir)
    touched = set(patches) | set(factors)
    missing = [n for n in touched if n not in wm]
    if missing:
        raise KeyError(f"{delta_path}: tensors {missing[:3]} are not in base {base_dir}")
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    add_dms_fields(base_dir, tmp, **fields)
    base_rows = {}
    for shard in sorted({wm[n] for n in touched}):
        with safe_open(os.path.join(base_dir, shard), "pt") as f:
            shard_meta = f.metadata() or {"format": "pt"}
        tensors = load_file(os.path.join(base_dir, shard))
        for name in sorted(n for n in touched if wm[n] == shard):
            t = tensors[name].clone()
            base_rows[name] = t.clone() if lora else None
            if name in factors:
                t = merge_lora(t, *factors[name], scale)
            if name in patches:
                rows, values = patches[name]
                if not lora:
                    base_rows[name] = t[rows].clone()
                t[rows] = values.to(t.dtype).reshape(t[rows].shape)
            tensors[name] = t
        os.remove(os.path.join(tmp, shard))  # a link to the base file: replace, never write into
        save_file(tensors, os.path.join(tmp, shard), metadata=shard_meta)
    if _fingerprint(base_rows) != meta.get("base_rows_sha256"):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{delta_path} was trained from a different base than {base_dir} "
                         f"(delta base: {meta.get('base_name')!r})")
    with open(os.path.join(tmp, COMPLETE_MARK), "w") as f:
        f.write(sha + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


# vllm_dms/ (this file is vllm_dms/tools/training/delta.py)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_DELTA = os.path.join(PACKAGE_DIR, "data", "smollm2-135m-dms-cr8-w16.safetensors")


def shipped_checkpoint(cache_dir: str | None = None) -> str:
    """The SmolLM2-135M DMS checkpoint trained by this package (cr 8, W 16), built once."""
    from vllm_dms.tools.checkpoints import SMOLLM2_DIR, cache_root
    out = os.path.join(cache_root(cache_dir), SMOLLM2_DIR + "-dms-trained-cr8-w16")
    return build_from_delta(SHIPPED_DELTA, out, base_dir=None)
