"""The few monkeypatches vllm_dms needs; each module has check() (read-only) and apply().

apply_all() runs every check() before any apply(), so a vLLM whose internals differ from
0.26.0 gets one clear error and no half-patched state (stock dtypes keep working).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable


class PatchError(RuntimeError):
    """vLLM's internals do not have the shape a patch was written for."""


def require_params(fn: Callable[..., Any], expected: tuple[str, ...], where: str) -> None:
    """Raise PatchError unless fn's parameters are exactly ``expected`` (names, in order)."""
    found = tuple(inspect.signature(fn).parameters)
    if found != expected:
        raise PatchError(f"{where}: expected parameters {expected}, found {found}")


def require_attr(obj: Any, name: str, where: str) -> Any:
    """Return obj.name or raise PatchError naming what is missing."""
    if not hasattr(obj, name):
        raise PatchError(f"{where}: {obj!r} has no attribute {name!r}")
    return getattr(obj, name)


def apply_all(logger: logging.Logger) -> bool:
    """Check, then apply, every patch. Returns False (after logging why) if vLLM's shape differs."""
    from vllm_dms.patches import cache_dtype, dummy_loader, engine, metrics, worker

    modules = (cache_dtype, engine, dummy_loader, metrics, worker)
    try:
        for mod in modules:
            mod.check()
    except PatchError as e:  # only our own shape check; anything else is a real bug
        from vllm_dms.version import REQUIRED_VLLM

        logger.error("vllm_dms disabled: vLLM internals differ from what the DMS patches "
                     "expect (%s); --kv-cache-dtype dms_fp8 will be rejected (other KV-cache "
                     "dtypes are unaffected). Install the released vllm==%s to use DMS.",
                     e, REQUIRED_VLLM)
        return False
    for mod in modules:
        mod.apply()
    return True
