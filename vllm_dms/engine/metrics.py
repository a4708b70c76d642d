"""DMS gauges on vLLM's Prometheus /metrics (installed for dms_fp8 engines by patches/metrics.py).

How the numbers travel (vLLM 0.26.0, paths under vllm/):

1. Engine core, each step: ``Scheduler.update_from_output`` calls ``make_stats``
   (v1/core/sched/scheduler.py:1946, 2406). ``DMSScheduler.make_stats`` puts
   ``DMSKVCacheManager.gauges()`` into ``SchedulerStats.kv_connector_stats`` (a ``dict[str, Any]``
   that is None here: DMS refuses KV connectors) under ``STATS_KEY``.
2. ``SchedulerStats`` rides ``EngineCoreOutputs.scheduler_stats`` (v1/engine/__init__.py:234)
   through msgpack; only dataclass fields survive, hence an existing field and no new attribute.
3. Front-end: ``AsyncLLM`` hands it to ``StatLoggerManager.record`` (v1/engine/async_llm.py:699),
   which calls every logger in order (loggers.py:1384): plugin loggers first, then vLLM's
   ``LoggingStatLogger`` (loggers.py:1337, 1350).
4. :class:`DMSPrometheusStatLogger` subclasses ``PrometheusStatLogger``, so vLLM uses it *instead
   of* its own (loggers.py:1359-1372): every stock series stays, ``vllm:kv_cache_usage_perc``
   included, which is ``DMSKVCacheManager.usage`` (compact reservation usage). It pops the DMS
   dict before setting the gauges: the stock Prometheus logger ignores ``kv_connector_stats``
   without a connector (loggers.py:1145 -> ``KVConnectorProm.observe`` returns), but
   ``LoggingStatLogger`` does not (loggers.py:221 -> ``KVConnectorLogging.observe`` reads
   ``connector_cls``, set only with a connector: AttributeError, distributed/kv_transfer/
   kv_connector/v1/metrics.py:57, 67).

Handshake: for a dms_fp8 config, the AsyncLLM patch sets ``METRICS_ENV`` before AsyncLLM starts
the engine core (async_llm.py:146), so the engine core inherits it; ``DMSScheduler`` attaches the
dict only then. A front-end without this logger (``LLMEngine``) thus never receives it. Non-DMS
engines are not touched at all (no stat-logger entry point: vLLM would force stats collection on
for every model, async_llm.py:123-130).
"""
from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import PrometheusStatLogger
from vllm.v1.metrics.utils import create_metric_per_engine

from vllm_dms import DMS_DTYPE
from vllm_dms.engine.scheduler import STATS_KEY

# DMSKVCacheManager.gauges() key -> documentation of gauge vllm:dms_<key>.
GAUGES = {
    "live_kv_tokens": "Live KV entries (token, layer, KV head) held by running DMS requests.",
    "evicted_kv_tokens": "KV entries (token, layer, KV head) of running requests evicted by "
                         "DMS: dense-equivalent minus live.",
    "compression_ratio": "Dense-equivalent KV entries (tokens * layers * KV heads) / live KV "
                         "entries over running requests (1 when none is held).",
    "arena_bytes_in_use": "Bytes of the compact DMS arena in use: state region plus blocks "
                          "reserved by requests (all layers).",
    "arena_bytes_free": "Bytes of the compact DMS arena free for new reservations (all layers).",
}


def take_dms_stats(scheduler_stats: Any) -> dict[str, float] | None:
    """Pop the DMS dict out of SchedulerStats (None if absent); leaves None if it was alone."""
    extra = getattr(scheduler_stats, "kv_connector_stats", None)
    if not extra or STATS_KEY not in extra:
        return None
    dms = extra.pop(STATS_KEY)
    if not extra:
        scheduler_stats.kv_connector_stats = None  # what downstream loggers expect here
    return dms


class DMSPrometheusStatLogger(PrometheusStatLogger):
    """vLLM's Prometheus logger plus ``vllm:dms_*`` gauges (only for a dms_fp8 engine)."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None):
        super().__init__(vllm_config, engine_indexes)
        self.dms_gauges: dict[str, dict[int, Any]] = {}
        if vllm_config.cache_config.cache_dtype != DMS_DTYPE:
            return  # any other engine: exactly the stock series
        for key, doc in GAUGES.items():
            gauge = self._gauge_cls(name=f"vllm:dms_{key}", documentation=doc,
                                    multiprocess_mode="mostrecent",
                                    labelnames=["model_name", "engine"])
            self.dms_gauges[key] = create_metric_per_engine(gauge, self.per_engine_labelvalues)
        for per_engine in self.dms_gauges["compression_ratio"].values():
            per_engine.set(1.0)  # before the first step, as when nothing is held

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        dms = take_dms_stats(scheduler_stats)  # before anything else reads kv_connector_stats
        if dms is not None:
            for key, per_engine in self.dms_gauges.items():
                per_engine[engine_idx].set(dms[key])
        super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)
