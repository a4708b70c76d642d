"""Make "dms_fp8" a valid KV-cache dtype string everywhere vLLM 0.26.0 checks the name.

Places (docs/vllm-0.26-plugin-points.md §2.1-2.3):
* ``CacheDType`` Literal: CacheConfig's dataclass field (argparse choices via
  ``_compute_kwargs``) and pydantic field (validation); CacheConfig and VllmConfig (which
  embeds CacheConfig's schema) are rebuilt.
* module globals holding the old Literal: vllm.config.cache (modules imported later pick up
  the new one from there), vllm.v1.attention.selector (membership assert), arg_utils.
* ``STR_DTYPE_TO_TORCH_DTYPE["dms_fp8"] = torch.uint8``: the cache is raw byte pages.
The remaining string checks on the LLM()/serve path (torch_utils.is_quantized_kv_cache,
kv_cache_interface.get_kv_quant_mode, attention.py's fp8 query-quant branches) key on an
"fp8" prefix / "per_token_head" suffix / "nvfp4", so "dms_fp8" reads as unquantized there:
no scale loading, no FP8 query quantisation. check() asserts that stays true.
"""
from __future__ import annotations

import sys
from typing import Literal, get_args, get_origin

from vllm_dms import DMS_DTYPE
from vllm_dms.patches import PatchError, require_attr

# Modules that bind the Literal by name at import; rebound if already imported.
_LITERAL_HOLDERS = ("vllm.config.cache", "vllm.v1.attention.selector", "vllm.engine.arg_utils")


def _field_annotations():
    from vllm.config import CacheConfig

    where = "vllm.config.CacheConfig.cache_dtype"
    dc = require_attr(CacheConfig, "__dataclass_fields__", where).get("cache_dtype")
    pyd = require_attr(CacheConfig, "__pydantic_fields__", where).get("cache_dtype")
    if dc is None or pyd is None:
        raise PatchError(f"{where}: field not found")
    return dc, pyd


def check() -> None:
    """Read-only: raise PatchError if vLLM's dtype plumbing is not the 0.26.0 shape."""
    import vllm.config.cache as cache_mod
    from vllm.config import VllmConfig  # noqa: F401  (must exist to be rebuilt)
    from vllm.utils import torch_utils

    for obj, where in ((cache_mod.CacheDType, "vllm.config.cache.CacheDType"),
                       (_field_annotations()[1].annotation, "CacheConfig.cache_dtype")):
        if get_origin(obj) is not Literal:
            raise PatchError(f"{where} is {obj!r}, expected a typing.Literal of dtype names")
    require_attr(torch_utils, "STR_DTYPE_TO_TORCH_DTYPE", "vllm.utils.torch_utils")
    if torch_utils.is_quantized_kv_cache(DMS_DTYPE):
        raise PatchError(f"is_quantized_kv_cache({DMS_DTYPE!r}) is True; vLLM would apply "
                         "FP8 scales/query quantisation to the DMS byte cache")
    arg_utils = sys.modules.get("vllm.engine.arg_utils")
    if arg_utils is not None:
        require_attr(require_attr(arg_utils, "_compute_kwargs", "vllm.engine.arg_utils"),
                     "cache_clear", "vllm.engine.arg_utils._compute_kwargs")


def apply() -> None:
    """Add "dms_fp8" (idempotent)."""
    import torch
    from pydantic.dataclasses import rebuild_dataclass

    import vllm.config.cache as cache_mod
    from vllm.config import CacheConfig, VllmConfig
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    dc_field, pyd_field = _field_annotations()
    values = get_args(pyd_field.annotation)
    if DMS_DTYPE not in values:
        new = Literal[values + (DMS_DTYPE,)]
        dc_field.type = new          # read by argparse kwargs (choices)
        pyd_field.annotation = new   # read by pydantic validation after the rebuild
        rebuild_dataclass(CacheConfig, force=True)
        rebuild_dataclass(VllmConfig, force=True)  # else VllmConfig(cache_config={...}) rejects it
        cache_mod.CacheDType = new
    new = pyd_field.annotation
    for name in _LITERAL_HOLDERS:
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "CacheDType"):
            mod.CacheDType = new
    arg_utils = sys.modules.get("vllm.engine.arg_utils")
    if arg_utils is not None:
        arg_utils._compute_kwargs.cache_clear()  # --kv-cache-dtype choices may be cached
    STR_DTYPE_TO_TORCH_DTYPE[DMS_DTYPE] = torch.uint8  # shared dict: every importer sees it
