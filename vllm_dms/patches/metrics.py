"""Add the DMS Prometheus logger to AsyncLLM, only for ``dms_fp8`` engines.

A ``vllm.stat_logger_plugins`` entry point would be loaded for every model and would switch stats
collection on even with --disable-log-stats (async_llm.py:123-130); wrapping AsyncLLM.__init__
keeps non-DMS engines exactly stock. For a dms_fp8 config it sets the handshake variable before
the engine core is spawned (so DMSScheduler attaches its gauges) and passes
``DMSPrometheusStatLogger`` as a custom logger, which replaces vLLM's own Prometheus logger.
"""
from __future__ import annotations

import os

_MARK = "__dms_wrapped__"
_HEAD = ("self", "vllm_config", "executor_class", "log_stats", "usage_context", "mm_registry",
         "log_requests", "start_engine_loop", "stat_loggers")


def check() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM
    init = AsyncLLM.__init__
    if not getattr(init, _MARK, False):
        require_params_prefix(init, _HEAD, "vllm.v1.engine.async_llm.AsyncLLM.__init__")


def require_params_prefix(fn, head, where) -> None:
    import inspect
    names = tuple(inspect.signature(fn).parameters)[: len(head)]
    if names != head:
        from vllm_dms.patches import PatchError
        raise PatchError(f"{where}: expected leading parameters {head}, found {names}")


def apply() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM
    original = AsyncLLM.__init__
    if getattr(original, _MARK, False):
        return

    def __init__(self, vllm_config, *args, **kwargs):
        if vllm_config.cache_config.cache_dtype == "dms_fp8":
            from vllm_dms.engine.metrics import DMSPrometheusStatLogger
            from vllm_dms.engine.scheduler import METRICS_ENV
            os.environ[METRICS_ENV] = "1"  # the engine core spawned below inherits it
            loggers = list(kwargs.get("stat_loggers") or [])
            if DMSPrometheusStatLogger not in loggers:
                kwargs["stat_loggers"] = loggers + [DMSPrometheusStatLogger]
        original(self, vllm_config, *args, **kwargs)

    setattr(__init__, _MARK, True)
    __init__.__wrapped__ = original
    AsyncLLM.__init__ = __init__
