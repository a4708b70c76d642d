"""DMSScheduler / DMSAsyncScheduler: vLLM's schedulers with the DMS ledger as KVCacheManager.

The ledger (reservation accounting, slots, release ordering) is ``vllm_dms.engine.ledger``
(``DMSKVCacheManager``, its docstring has the contract). Here, with a DMSCompactSpec KV cache:

* ``__init__`` refuses what DMS cannot schedule (a sync/async mismatch, KV / EC connectors,
  routed experts) and installs ``DMSKVCacheManager`` as the scheduler's KV cache manager.
* ``add_request`` applies the per-request rules of ``vllm_dms.engine.validation`` and finishes a
  violating request with FINISHED_ERROR (its output goes out with the next step; the engine
  keeps serving).
* ``schedule`` puts the ledger's orders (freed slots, forks, snapshots) on the SchedulerOutput and
  ``update_from_output`` absorbs the worker's measurements from the ModelRunnerOutput
  (``vllm_dms.engine.channel``).
* Metrics: ``make_stats`` adds ``DMSKVCacheManager.gauges()`` to the SchedulerStats it sends to the
  front-end, read there by ``vllm_dms.engine.metrics`` (the route and its handshake are described
  there).
"""
from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus

from vllm_dms.engine.channel import FEEDBACK_ATTR, ORDERS_ATTR
from vllm_dms.engine.ledger import DMSKVCacheManager, dms_spec_of
from vllm_dms.engine.validation import request_problem

__all__ = ["DMSAsyncScheduler", "DMSKVCacheManager", "DMSScheduler", "DMSSchedulerMixin",
           "METRICS_ENV", "STATS_KEY", "dms_spec_of"]

logger = init_logger(__name__)

# SchedulerStats.kv_connector_stats key of the DMS gauges (vllm_dms.engine.metrics pops it).
STATS_KEY = "vllm_dms"
# Set to "1" by the front-end's DMS stat logger (vllm_dms.engine.metrics) before the engine starts.
METRICS_ENV = "VLLM_DMS_METRICS"


class DMSSchedulerMixin:
    """The DMS part of DMSScheduler / DMSAsyncScheduler (put before vLLM's scheduler class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dms: DMSKVCacheManager | None = None
        self._dms_refused: list[Request] = []
        # Only a front-end that pops the gauges (vllm_dms.engine.metrics) may receive them.
        self._dms_metrics = os.environ.get(METRICS_ENV) == "1"
        self._vocab_size = self.vllm_config.model_config.get_vocab_size()
        if dms_spec_of(self.kv_cache_config) is None:
            return  # dense model: everything stays stock
        is_async = self.scheduler_config.async_scheduling
        if is_async != isinstance(self, AsyncScheduler):
            want = "DMSAsyncScheduler" if is_async else "DMSScheduler"
            raise ValueError(f"DMS: async_scheduling={is_async} needs {want}, "
                             f"not {type(self).__name__}")
        if self.connector is not None or self.ec_connector is not None:
            raise ValueError("DMS does not support KV / EC connectors")
        if self.enable_return_routed_experts:
            raise ValueError("DMS does not support enable_return_routed_experts")
        self.dms = DMSKVCacheManager(
            self.kv_cache_config, max_num_seqs=self.max_num_running_reqs,
            max_model_len=self.max_model_len, scheduler_block_size=self.block_size,
            hash_block_size=self.hash_block_size,
            max_in_flight_tokens=self.vllm_config.max_in_flight_tokens,
            use_eagle=self.use_eagle, log_stats=self.log_stats,
            enable_kv_cache_events=self.enable_kv_cache_events,
            dcp_world_size=self.dcp_world_size, pcp_world_size=1,
            metrics_collector=self.kv_metrics_collector, watermark=self.scheduler_config.watermark,
            enable_prefix_caching=bool(self.cache_config.enable_prefix_caching),
            tp_size=self.vllm_config.parallel_config.tensor_parallel_size)
        self.kv_cache_manager = self.dms

    def _refusal(self, request: Request) -> str | None:
        """Why the engine must not run a new request (the front-end normally caught it)."""
        problem = request_problem(request.prompt_token_ids, vocab_size=self._vocab_size,
                                  resumable=request.resumable)
        if problem is not None:
            return f"DMS request {request.request_id}: {problem[1]}"
        return self.dms.refusal(request)

    def add_request(self, request: Request) -> None:
        reason = None
        if self.dms is not None and request.request_id not in self.requests:
            reason = self._refusal(request)
        super().add_request(request)
        if reason is not None:
            # Finish now (it must not block the queue head); the output goes out next step.
            logger.error(reason)
            request.stop_reason = reason
            self.finish_requests(request.request_id, RequestStatus.FINISHED_ERROR)
            self._dms_refused.append(request)

    def schedule(self, *args: Any, **kwargs: Any):
        if self.dms is None:
            return super().schedule(*args, **kwargs)
        self.dms.refresh_entries()
        out = super().schedule(*args, **kwargs)
        # Everything freed, forked or snapshotted since the last schedule (this one's
        # preemptions included) travels to the workers with this step (vllm_dms.engine.channel).
        setattr(out, ORDERS_ATTR, self.dms.link.take_orders())
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        if self.dms is not None:  # first: frees below (prefix entries) keep the newest rows
            self.dms.link.absorb(getattr(model_runner_output, FEEDBACK_ATTR, None))
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req in self._dms_refused:
            eco = outputs.get(req.client_index)
            if eco is None:
                eco = outputs[req.client_index] = EngineCoreOutputs(outputs=[])
            eco.outputs.append(EngineCoreOutput(
                request_id=req.request_id, new_token_ids=[], finish_reason=FinishReason.ERROR,
                stop_reason=req.stop_reason, events=req.take_events(),
                trace_headers=req.trace_headers))
        self._dms_refused.clear()
        return outputs

    def dms_stats(self) -> dict[str, Any]:
        return {} if self.dms is None else self.dms.dms_stats()

    def make_stats(self, *args: Any, **kwargs: Any):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None and self.dms is not None and self._dms_metrics:
            # kv_connector_stats is None here (DMS refuses KV connectors) and survives msgpack.
            stats.kv_connector_stats = {**(stats.kv_connector_stats or {}),
                                        STATS_KEY: self.dms.gauges()}
        return stats


class DMSScheduler(DMSSchedulerMixin, Scheduler):
    """Stock Scheduler; with a DMSCompactSpec KV cache its KVCacheManager is DMSKVCacheManager."""


class DMSAsyncScheduler(DMSSchedulerMixin, AsyncScheduler):
    """vLLM's AsyncScheduler with the same DMS accounting (measurements may lag, see _measured)."""
