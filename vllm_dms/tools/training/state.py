"""Resumable training state in a folder of small files (each <= MAX_FILE bytes).

DIR/current/ holds manifest.json (step, hyper-parameters, optimizer param groups, tensor index)
and shard-NNNNN.safetensors files; a tensor bigger than a shard is cut into flat pieces. A save
writes DIR/.writing/ and then swaps it in, so a run killed mid-save leaves the previous state.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

MAX_FILE = 16 * 1024 * 1024  # the device transfers files of at most 16 MiB each
MAX_FILE_HARD = MAX_FILE  # the manifest (~100 KB) is checked against this, not a test's limit
CURRENT, WRITING, OLD = "current", ".writing", ".old"
MANIFEST = "manifest.json"


def _pieces(t: torch.Tensor, limit: int) -> list[torch.Tensor]:
    flat = t.detach().cpu().contiguous().reshape(-1)
    per = max(1, limit // max(1, flat.element_size()))
    return [flat[i:i + per].clone() for i in range(0, max(1, flat.numel()), per)]


def save_state(root: str, tensors: dict[str, torch.Tensor], info: dict,
               max_file: int | None = None) -> list[str]:
    """Write tensors (any dtypes) and the JSON-able info under root/current; -> file paths."""
    from safetensors.torch import save_file
    max_file = max_file or MAX_FILE  # read at call time (tests lower it)
    budget = max_file - 128  # the header's fixed part; each entry's own bytes are counted below
    tmp = os.path.join(root, WRITING)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    index, shard, used, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, used, n
        if shard:
            save_file(shard, os.path.join(tmp, f"shard-{n:05d}.safetensors"))
            n, shard, used = n + 1, {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        keys = []
        for j, piece in enumerate(_pieces(t, budget // 2)):
            key = f"{name}#{j}"
            cost = piece.nbytes + len(key) + 96  # data + its JSON header entry (upper bound)
            if used + cost > budget:
                flush()
            shard[key] = piece
            used += cost
            keys.append([n, key])
        index[name] = dict(shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                           pieces=keys)
    flush()
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(dict(info=info, index=index), f)
    if os.path.getsize(os.path.join(tmp, MANIFEST)) > MAX_FILE_HARD:
        raise ValueError("save_state: the manifest exceeds the transfer limit")
    cur, old = os.path.join(root, CURRENT), os.path.join(root, OLD)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(cur):
        os.replace(cur, old)
    os.replace(tmp, cur)
    shutil.rmtree(old, ignore_errors=True)
    return sorted(os.path.join(cur, x) for x in os.listdir(cur))


def has_state(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, CURRENT, MANIFEST))


def load_info(root: str) -> dict:
    """The info saved with the state, without reading its tensors."""
    with open(os.path.join(root, CURRENT, MANIFEST)) as f:
        return json.load(f)["info"]


def load_state(root: str) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors, info) as saved by save_state."""
    from safetensors import safe_open
    cur = os.path.join(root, CURRENT)
    with open(os.path.join(cur, MANIFEST)) as f:
        man = json.load(f)
    handles, out = {}, {}
    try:
        for name, ent in man["index"].items():
            parts = []
            for n, key in ent["pieces"]:
                if n not in handles:
                    handles[n] = safe_open(os.path.join(cur, f"shard-{n:05d}.safetensors"), "pt")
                parts.append(handles[n].get_tensor(key))
            out[name] = torch.cat(parts).reshape(ent["shape"]).to(getattr(torch, ent["dtype"]))
    finally:
        handles.clear()
    return out, man["info"]


def optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list]:
    """Optimizer state as {"opt/<param name>/<key>": tensor} plus its param groups (JSON)."""
    sd = opt.state_dict()
    out = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            out[f"opt/{names[idx]}/{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in sd["param_groups"]]
    return out, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups: list, names: list[str],
                   device) -> None:
    state: dict = {}
    for idx, name in enumerate(names):
        pre = f"opt/{name}/"
        st = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        if st:
            # AdamW keeps "step" on the CPU (capturable=False) and moments on the param's device
            state[idx] = {k: (v if k == "step" else v.to(device)) for k, v in st.items()}
    opt.load_state_dict(dict(state=state, param_groups=groups))
