"""DMSConfig: the one validated description of a DMS checkpoint plus the engine knobs we honour.

Built once from the checkpoint directory (config.json ``dms_*`` keys as NVIDIA ships them, or a
FastDMS-style ``dms_metadata.json``) and passed explicitly everywhere else. Nothing here has a
silent default: a missing or contradictory field raises :class:`DMSConfigError` naming it.

Decision-shift rule (``decision_shift``): an explicit ``dms_decision_shift`` (config.json) or
``decision_shift`` (dms_metadata.json) wins. Otherwise NVIDIA-style config.json fields imply 1
(the decision computed at token t flags token t-1) and a ``dms_metadata.json`` implies 0 (each
token flags itself), matching how each family of checkpoints was trained.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any

# The four fields NVIDIA's checkpoints carry; all four must be present together.
NVIDIA_KEYS = ("dms_window_size", "dms_alpha_scale", "dms_initial_alpha_offset", "dms_cr")
# FastDMS metadata keys (dms_metadata.json, optionally nested under "config").
FASTDMS_KEYS = ("window_size", "alpha_scale", "alpha_offset", "target_cr")
SUPPORTED_ARCHS = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3",
                   "DMSLlamaForCausalLM": "llama", "DMSQwen3ForCausalLM": "qwen3"}
METADATA_FILE = "dms_metadata.json"


class DMSConfigError(ValueError):
    """A checkpoint or engine argument that DMS cannot serve; the message names the field."""


@dataclasses.dataclass(frozen=True)
class DMSConfig:
    arch: str                 # "llama" | "qwen3"
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    window: int               # W: a flagged token stays visible to W+1 queries (itself + W)
    alpha_scale: float
    alpha_offset: float
    decision_shift: int       # 1: decision at t flags t-1 (NVIDIA); 0: a token flags itself
    target_cr: float | None   # documentation only (training target)
    source: str               # where the DMS fields came from
    zero_lane_after_rope: bool = True  # NVIDIA zeroes the borrowed lane before and after RoPE

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def decisions_from_lane(self, lane: "Any") -> "Any":
        """Exact decision from the raw borrowed-lane values (any tensor), compared in fp32."""
        return lane.float() * self.alpha_scale - self.alpha_offset > 0

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(group=self.group)
        return d

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, model_dir: str, hf_overrides: dict | None = None, *,
                        compact: bool = True) -> "DMSConfig":
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise DMSConfigError(f"{model_dir}: no config.json")
        hf = _read_config(model_dir, hf_overrides)
        meta = None
        meta_path = os.path.join(model_dir, METADATA_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            meta = meta.get("config", meta)
        return cls.from_dicts(hf, meta, where=model_dir, compact=compact)

    @classmethod
    def from_dicts(cls, hf: dict, meta: dict | None = None, where: str = "<config>", *,
                   compact: bool = True) -> "DMSConfig":
        """compact=False: for no-evict serving (another KV dtype), where eviction is off anyway."""
        _reject_unsupported_variants(hf, meta, where, compact)
        shape = _shape_fields(hf, where)
        nv = [k for k in NVIDIA_KEYS if k in hf]
        if meta is not None:
            fields, source, shift = _from_fastdms(meta, where), f"{where}/{METADATA_FILE}", 0
            explicit = meta.get("decision_shift", hf.get("dms_decision_shift"))
        elif nv:
            missing = [k for k in NVIDIA_KEYS if k not in hf]
            if missing:
                raise DMSConfigError(
                    f"{where}: partial DMS fields in config.json; missing {missing} "
                    f"(have {nv}; all of {list(NVIDIA_KEYS)} are required)")
            fields = dict(window=hf["dms_window_size"], alpha_scale=hf["dms_alpha_scale"],
                          alpha_offset=hf["dms_initial_alpha_offset"], target_cr=hf["dms_cr"])
            source, shift, explicit = f"{where}/config.json", 1, hf.get("dms_decision_shift")
        else:
            raise DMSConfigError(
                f"{where}: not a DMS checkpoint: config.json has none of {list(NVIDIA_KEYS)} "
                f"and there is no {METADATA_FILE} (needs {list(FASTDMS_KEYS)}); add them, or "
                "serve a model without DMS fields with --kv-cache-dtype auto or fp8")
        if explicit is not None:
            if explicit not in (0, 1) or isinstance(explicit, bool):
                raise DMSConfigError(f"{where}: dms_decision_shift must be 0 or 1, got {explicit!r}")
            shift = int(explicit)
        window, scale, offset = fields["window"], fields["alpha_scale"], fields["alpha_offset"]
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise DMSConfigError(f"{where}: dms_window_size must be an integer >= 1, got {window!r}")
        if not isinstance(scale, (int, float)) or scale <= 0:
            raise DMSConfigError(f"{where}: dms_alpha_scale must be > 0, got {scale!r}")
        if not isinstance(offset, (int, float)):
            raise DMSConfigError(f"{where}: dms_initial_alpha_offset must be a number, got {offset!r}")
        cr = fields["target_cr"]
        if cr is not None and (not isinstance(cr, (int, float)) or cr < 1):
            raise DMSConfigError(f"{where}: dms_cr must be a number >= 1, got {cr!r}")
        return cls(window=window, alpha_scale=float(scale), alpha_offset=float(offset),
                   decision_shift=shift, target_cr=None if cr is None else float(cr),
                   source=source, **shape)


def compact_head_size_ok(head_dim: int) -> bool:
    """The head sizes the DMS kernels tile (16-wide tiles, at most 256 lanes)."""
    return head_dim % 16 == 0 and 16 <= head_dim <= 256


def check_serving(model_dir: str, hf_overrides: dict | None = None,
                  dtype: Any = "auto") -> DMSConfig:
    """Every checkpoint check ``--kv-cache-dtype dms_fp8`` makes before start-up, in one place:
    ``vllm serve`` / ``vllm.LLM`` (patches/engine.py) and ``vllm-dms inspect`` both call it, so
    inspect passes exactly the checkpoints serve accepts. ``dtype``: vLLM's ``--dtype``."""
    dms = DMSConfig.from_checkpoint(model_dir, hf_overrides)
    if not compact_head_size_ok(dms.head_dim):
        raise DMSConfigError(
            f"{model_dir}: head_dim={dms.head_dim} is not supported by the DMS attention "
            "backend (needs a multiple of 16, at most 256); serve this checkpoint with "
            "--kv-cache-dtype auto (no-evict mode) instead of dms_fp8")
    hf = _read_config(model_dir, hf_overrides)
    field = kv_scale_field(model_dir, hf)
    if field is not None:
        raise DMSConfigError(
            f"{model_dir}: {field}: checkpoint KV-cache scales are not supported with "
            "--kv-cache-dtype dms_fp8 (the DMS arena stores FP8 K/V with scale 1 and would "
            "ignore them); serve this checkpoint with another --kv-cache-dtype (e.g. fp8)")
    served = served_dtype(hf, dtype)
    if served not in (None, DMS_MODEL_DTYPE):
        raise DMSConfigError(dtype_refusal(
            f"--dtype auto (the checkpoint's torch_dtype {served})"
            if str(dtype).lower() == "auto" else f"--dtype {served}"))
    return dms


DMS_MODEL_DTYPE = "bfloat16"  # every DMS kernel wrapper takes bf16 q/k/v
_DTYPE_NAMES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16",
                "float": "float32", "float32": "float32"}


def served_dtype(hf: dict, dtype: Any) -> str | None:
    """The model dtype vLLM will run for ``--dtype`` (a name, a torch dtype or "auto"); None
    when only vLLM's platform can tell (auto on a float32 or untyped checkpoint)."""
    name = str(dtype).lower().removeprefix("torch.")
    if name != "auto":
        return _DTYPE_NAMES.get(name, name)
    declared = str(hf.get("torch_dtype") or hf.get("dtype") or "").removeprefix("torch.")
    # vLLM's auto keeps a 16-bit checkpoint dtype and downcasts float32 per platform
    return declared if declared in ("float16", "bfloat16") else None


def dtype_refusal(how: str) -> str:
    """The message for a model dtype other than bf16; ``how``: "--dtype ..." and how that
    dtype came about (the message names the flag first)."""
    return (f"{how}: the DMS kernels run {DMS_MODEL_DTYPE} only with --kv-cache-dtype "
            f"dms_fp8; pass --dtype {DMS_MODEL_DTYPE} (or use another --kv-cache-dtype)")


def _read_config(model_dir: str, hf_overrides: dict | None) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    return {**hf, **(hf_overrides or {})}


# Weight names of attention KV-cache scales, as quantizers write them (vLLM maps each of these
# onto an attention layer's k_scale / v_scale when it loads the checkpoint).
_KV_SCALE_NAME = re.compile(r"\.(k|v|kv)_scale$|\.[kv]_proj\.output_scale$|\.[kv]_cache\.scale$")


def kv_scale_field(model_dir: str, hf: dict) -> str | None:
    """The field or weight through which a checkpoint carries KV-cache scales, None if none:
    a KV-cache scheme in its quantization config (compressed-tensors / ModelOpt
    ``kv_cache_scheme``, ModelOpt ``kv_cache_quant_algo``, Quark ``export.kv_cache_group``),
    else a scale entry among its safetensors weights (an FP8 checkpoint's k_scale / v_scale)."""
    for where, q in (("quantization_config", hf.get("quantization_config")),
                     ("hf_quant_config.json", _json(model_dir, "hf_quant_config.json"))):
        if isinstance(q, dict):
            for sub, d in (("", q), ("quantization.", q.get("quantization")),
                           ("export.", q.get("export"))):
                for key in ("kv_cache_scheme", "kv_cache_quant_algo", "kv_cache_group"):
                    if isinstance(d, dict) and d.get(key):
                        return f"{where}.{sub}{key}"
    return next((name for name in _weight_names(model_dir) if _KV_SCALE_NAME.search(name)),
                None)


def _json(model_dir: str, name: str) -> Any:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _weight_names(model_dir: str) -> list[str]:
    """Tensor names of the safetensors weights: from the index, else from each file's header
    (its first 8 bytes give the JSON header's length; no tensor is read)."""
    index = _json(model_dir, "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        return list(index["weight_map"])
    names: list[str] = []
    for fn in sorted(os.listdir(model_dir)):
        if fn.endswith(".safetensors"):
            with open(os.path.join(model_dir, fn), "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return names


def dms_config_from_vllm(vllm_config: Any) -> DMSConfig:
    """The DMSConfig of the model a VllmConfig serves (engine core, workers, scheduler).

    Rebuilt from the checkpoint directory plus dict ``hf_overrides``, exactly as the startup
    validator built it, so nothing has to travel inside VllmConfig. Cached per process.
    """
    mc = vllm_config.model_config
    overrides = mc.hf_overrides if isinstance(mc.hf_overrides, dict) else {}
    cc = getattr(vllm_config, "cache_config", None)
    compact = cc is None or cc.cache_dtype == "dms_fp8"  # unknown: validate as for dms_fp8
    return _cached_from_checkpoint(mc.model, json.dumps(overrides, sort_keys=True, default=str),
                                   compact)


@functools.lru_cache(maxsize=8)
def _cached_from_checkpoint(model_dir: str, overrides_json: str, compact: bool) -> DMSConfig:
    return DMSConfig.from_checkpoint(model_dir, json.loads(overrides_json) or None,
                                     compact=compact)


def has_dms_fields(model_dir: str) -> bool:
    """True if the checkpoint carries any DMS field (complete or not)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return False
    return (any(k.startswith("dms_") for k in hf)
            or os.path.isfile(os.path.join(model_dir, METADATA_FILE)))


def _reject_unsupported_variants(hf: dict, meta: dict | None, where: str, compact: bool) -> None:
    src = dict(hf, **(meta or {}))
    if src.get("dms_separate_alpha") or src.get("separate_alpha"):
        raise DMSConfigError(
            f"{where}: dms_separate_alpha: true (a separate alpha adapter, NVIDIA variant B) is not "
            "supported; vllm_dms serves the borrowed-query-lane variant (dms_separate_alpha: false)")
    per = src.get("dms_alpha_per", src.get("alpha_per", "head"))
    if per != "head":
        raise DMSConfigError(
            f"{where}: dms_alpha_per: {per!r} is not supported; only per-head decisions "
            "(dms_alpha_per: \"head\") are served")
    if compact and src.get("dms_disable_eviction"):
        raise DMSConfigError(
            f"{where}: dms_disable_eviction: true; serve this checkpoint with --kv-cache-dtype auto "
            "(no-evict mode) instead of dms_fp8")


def _shape_fields(hf: dict, where: str) -> dict:
    archs = hf.get("architectures") or []
    arch = next((SUPPORTED_ARCHS[a] for a in archs if a in SUPPORTED_ARCHS), None)
    if arch is None:
        raise DMSConfigError(
            f"{where}: architectures={archs!r} is not supported by DMS; "
            f"supported: {sorted(set(SUPPORTED_ARCHS))}")
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if key not in hf:
            raise DMSConfigError(f"{where}: config.json lacks {key}")
    nq = hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads", nq)
    # Checked before any arithmetic so a bad value names its field, not a ZeroDivisionError.
    for key, value in (("num_hidden_layers", hf["num_hidden_layers"]),
                       ("num_attention_heads", nq), ("num_key_value_heads", nkv),
                       ("hidden_size", hf["hidden_size"])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DMSConfigError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // nq
    if nq % nkv:
        raise DMSConfigError(f"{where}: num_attention_heads={nq} is not a multiple of "
                             f"num_key_value_heads={nkv}")
    if head_dim % 2 or head_dim < 16 or head_dim > 256:
        raise DMSConfigError(f"{where}: head_dim={head_dim} unsupported (need even, 16..256)")
    if nq // nkv > 16:
        raise DMSConfigError(f"{where}: GQA group {nq // nkv} (num_attention_heads={nq} / "
                             f"num_key_value_heads={nkv}) is not supported; the DMS kernels "
                             "need a group <= 16")
    if hf.get("sliding_window") and hf.get("use_sliding_window", arch == "llama"):
        raise DMSConfigError(f"{where}: sliding_window={hf['sliding_window']} attention layers "
                             "are not supported with DMS (full attention only: no "
                             "sliding_window, or use_sliding_window: false)")
    return dict(arch=arch, num_layers=hf["num_hidden_layers"], num_q_heads=nq,
                num_kv_heads=nkv, head_dim=head_dim)


def _from_fastdms(meta: dict, where: str) -> dict:
    def pick(*names):
        for n in names:
            if n in meta:
                return meta[n]
        raise DMSConfigError(f"{where}/{METADATA_FILE}: missing {names[0]} "
                             f"(also accepted: {list(names[1:])})")
    return dict(window=pick("window_size", "dms_window_size"),
                alpha_scale=pick("alpha_scale", "dms_alpha_scale"),
                alpha_offset=pick("alpha_offset", "dms_alpha_offset", "dms_initial_alpha_offset"),
                target_cr=meta.get("target_cr", meta.get("dms_cr")))
