"""The one startup validator: wraps ``EngineArgs.create_engine_config`` (vllm/engine/arg_utils.py).

It runs in the process that builds the VllmConfig (the API server for ``vllm serve``, the
user's process for ``vllm.LLM``), before any GPU work, so bad checkpoints and unsupported
flags fail fast with a message naming the field or flag.

* ``kv_cache_dtype == "dms_fp8"``: ``check_serving`` on the local checkpoint (the checks
  ``vllm-dms inspect`` runs: DMS fields, head size, KV-cache scales, model dtype);
  architectures routed to the DMS model class; attention backend CUSTOM; features DMS cannot
  serve are rejected naming the flag; chunked prefill and prefix caching keep vLLM's defaults
  (on); one log line says what was resolved;
  afterwards ``scheduler_config.scheduler_cls`` is set to the DMS scheduler (its async variant
  when vLLM resolved async scheduling on, its default), and this process's InputProcessor gets the DMS request checks (``vllm_dms.engine.validation``: HTTP 400 up front).
* other dtypes, checkpoint with DMS fields: validated (no-evict rules) and routed to the DMS
  model class (no-evict mode); never served as a plain model with its decision lane live.
* other dtypes, any other checkpoint: untouched.
"""
from __future__ import annotations

import json
import os
from typing import Any

from vllm_dms import (ASYNC_SCHEDULER_PATH, DMS_ARCHITECTURES, DMS_DTYPE, LOGGER_NAME,
                      SCHEDULER_PATH)
from vllm_dms.engine.config import (DMS_MODEL_DTYPE, SUPPORTED_ARCHS, DMSConfig, DMSConfigError,
                                    check_serving, dtype_refusal, has_dms_fields)
from vllm_dms.patches import PatchError, require_params

_EXPECTED_PARAMS = ("self", "usage_context", "headless")
_CUSTOM = "CUSTOM"
# (EngineArgs attribute, CLI flag, what it is): each must stay at its default (1) for DMS.
# Tensor parallelism is served (rank-local KV heads, vllm_dms.engine.tp) and checked in _prepare_dms.
_PARALLEL = (("pipeline_parallel_size", "--pipeline-parallel-size", "pipeline parallelism"),
             ("data_parallel_size", "--data-parallel-size", "data parallelism"),
             ("decode_context_parallel_size", "--decode-context-parallel-size",
              "decode context parallelism"),
             ("prefill_context_parallel_size", "--prefill-context-parallel-size",
              "prefill context parallelism"))
# (EngineArgs attribute, CLI flag, why): each must stay off (False) for DMS.
_MUST_BE_OFF = (
    ("enable_lora", "--enable-lora",
     "LoRA (an adapter on qkv_proj changes the borrowed query lane that carries the DMS "
     "decisions)"),
    ("calculate_kv_scales", "--calculate-kv-scales",
     "computed KV-cache scales (the DMS arena stores FP8 K/V with scale 1)"),
)
# (EngineArgs attribute, CLI flag, why): each must be unset (None / empty) for DMS.
_MUST_BE_UNSET = (
    ("speculative_config", "--speculative-config", "speculative decoding"),
    ("spec_method", "--spec-method", "speculative decoding"),
    ("spec_model", "--spec-model", "speculative decoding"),
    ("spec_tokens", "--spec-tokens", "speculative decoding"),
    ("kv_transfer_config", "--kv-transfer-config",
     "KV connectors (they read dense slot mappings that do not address compact pages)"),
    ("kv_offloading_size", "--kv-offloading-size", "KV offloading (a KV connector)"),
    ("kv_cache_dtype_skip_layers", "--kv-cache-dtype-skip-layers",
     "per-layer dtype skips (every attention layer must use the DMS cache)"),
)


# Executors whose workers are called through WorkerWrapperBase (vllm_dms.patches.worker).
_EXECUTORS = (None, "uni", "mp", "external_launcher")

DMS_BLOCK_SIZE = 64  # default --block-size with dms_fp8 (any multiple of 16 works)


def _logger():
    from vllm.logger import init_logger

    return init_logger(LOGGER_NAME)


def check() -> None:
    from vllm.engine.arg_utils import EngineArgs

    fn = getattr(EngineArgs.create_engine_config, "__wrapped__",
                 EngineArgs.create_engine_config)
    require_params(fn, _EXPECTED_PARAMS, "vllm.engine.arg_utils.EngineArgs.create_engine_config")
    names = {f for f in EngineArgs.__dataclass_fields__}
    wanted = {"model", "kv_cache_dtype", "hf_overrides", "attention_backend", "attention_config",
              "enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens",
              "max_model_len", "async_scheduling", "scheduler_cls", "block_size",
              "enable_sleep_mode", "dtype"}
    wanted |= {a for a, _, _ in _PARALLEL + _MUST_BE_OFF + _MUST_BE_UNSET}
    wanted |= {"tensor_parallel_size", "distributed_executor_backend"}
    if missing := sorted(wanted - names):
        raise PatchError(f"vllm.engine.arg_utils.EngineArgs lacks fields {missing}")


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "__dms_wrapped__", False):
        return

    def create_engine_config(self, usage_context=None, headless=False):
        if self.kv_cache_dtype == DMS_DTYPE:
            dms = _prepare_dms(self)
            vllm_config = original(self, usage_context, headless)
            _finish_dms(vllm_config, f"{self.model} ({dms.arch}, window={dms.window}, "
                                     f"decision_shift={dms.decision_shift})", dtype=self.dtype)
            return vllm_config
        _route_no_evict(self)
        return original(self, usage_context, headless)

    create_engine_config.__wrapped__ = original
    create_engine_config.__dms_wrapped__ = True
    create_engine_config.__doc__ = original.__doc__
    EngineArgs.create_engine_config = create_engine_config


# ----------------------------------------------------------------------------- dms_fp8
def _prepare_dms(args: Any) -> DMSConfig:
    """Validate and adjust EngineArgs in place before vLLM builds the config."""
    if not os.path.isdir(args.model):
        raise DMSConfigError(
            f"--model {args.model!r}: --kv-cache-dtype {DMS_DTYPE} needs a local checkpoint "
            "directory (its config.json / dms_metadata.json are validated before start-up); "
            "download the model and pass its directory")
    overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else None
    dms = check_serving(args.model, overrides, args.dtype)  # the checks inspect runs too
    _reject_unsupported(args)
    from vllm_dms.engine.tp import shard_heads
    shard_heads(dms, args.tensor_parallel_size or 1)  # each KV head and its lane on one rank
    # chunked prefill, prefix caching and async scheduling: vLLM's defaults (all on); with
    # chunked prefill off and the token budget unset, vLLM raises it to >= max_model_len itself
    if args.block_size is None:
        args.block_size = DMS_BLOCK_SIZE  # slots per arena sub-page: one decode tile
    if args.attention_backend is None or _backend_name(args.attention_backend) == "AUTO":
        if args.attention_config.backend is None:
            args.attention_backend = _CUSTOM
    args.hf_overrides = _route(args.hf_overrides, DMS_ARCHITECTURES[dms.arch])
    return dms


def _reject_unsupported(args: Any) -> None:
    def reject(flag: str, what: str) -> None:
        raise DMSConfigError(f"{flag}: {what} is not supported with --kv-cache-dtype "
                             f"{DMS_DTYPE}; remove {flag} or use another --kv-cache-dtype")

    if args.enable_sleep_mode:
        reject("--enable-sleep-mode", "sleep mode (waking re-maps the KV memory that holds the "
               "DMS arena state without re-initialising it)")
    for attr, flag, what in _PARALLEL:
        if (getattr(args, attr) or 1) > 1:
            reject(flag, f"{what} > 1")
    for attr, flag, what in _MUST_BE_OFF:
        if getattr(args, attr):
            reject(flag, what)
    for attr, flag, what in _MUST_BE_UNSET:
        if getattr(args, attr) not in (None, [], {}):
            reject(flag, what)
    if args.distributed_executor_backend not in _EXECUTORS:
        reject("--distributed-executor-backend", f"executor {args.distributed_executor_backend!r} "
               f"(its workers bypass the worker entry point that carries the DMS step "
               f"messages; use one of {sorted(e for e in _EXECUTORS if e)})")
    for flag, backend in (("--attention-backend", args.attention_backend),
                          ("--attention-config.backend", args.attention_config.backend)):
        if backend is not None and _backend_name(backend) not in (_CUSTOM, "AUTO"):
            reject(flag, f"attention backend {_backend_name(backend)} (DMS uses {_CUSTOM})")
    if args.scheduler_cls is not None and args.scheduler_cls not in (SCHEDULER_PATH,
                                                                     ASYNC_SCHEDULER_PATH):
        reject("--scheduler-cls", f"scheduler {args.scheduler_cls!r} (DMS uses {SCHEDULER_PATH} "
               f"or, with async scheduling, {ASYNC_SCHEDULER_PATH})")
    if (args.enable_chunked_prefill is False and args.max_num_batched_tokens is not None
            and args.max_model_len is not None
            and args.max_num_batched_tokens < args.max_model_len):
        reject("--max-num-batched-tokens",
               f"max_num_batched_tokens={args.max_num_batched_tokens} < max_model_len="
               f"{args.max_model_len} without --enable-chunked-prefill (a prompt must fit one "
               f"step)")


def _finish_dms(vllm_config: Any, checkpoint: str = "", dtype: Any = "auto") -> None:
    """Check what vLLM resolved, install the DMS scheduler, log the one start-up line.

    dtype: the user's --dtype (named if vLLM resolved another model dtype)."""
    sc, cc = vllm_config.scheduler_config, vllm_config.cache_config
    served = str(vllm_config.model_config.dtype).removeprefix("torch.")
    if served != DMS_MODEL_DTYPE:  # what check_serving could not predict (platform fallback)
        raise DMSConfigError(dtype_refusal(f"--dtype {dtype} (resolved by vLLM to {served})"))
    backend = vllm_config.attention_config.backend
    if backend is None or backend.name != _CUSTOM:
        raise DMSConfigError(f"attention backend resolved to {backend}, DMS needs {_CUSTOM}")
    max_len = vllm_config.model_config.max_model_len
    if not sc.enable_chunked_prefill and sc.max_num_batched_tokens < max_len:
        raise DMSConfigError(
            f"--max-num-batched-tokens: max_num_batched_tokens={sc.max_num_batched_tokens} < "
            f"max_model_len={max_len} (chunked prefill is off with {DMS_DTYPE})")
    sc.scheduler_cls = _scheduler_path(sc.async_scheduling)  # the one vLLM finally resolved
    chunked = (f"on (max_num_batched_tokens={sc.max_num_batched_tokens})"
               if sc.enable_chunked_prefill else "off")
    _logger().info(
        "vllm_dms: --kv-cache-dtype %s for %s: model %s, attention backend %s, scheduler %s, "
        "block size %s; chunked prefill %s, prefix caching %s, async scheduling %s",
        DMS_DTYPE, checkpoint, vllm_config.model_config.architectures[0], _CUSTOM,
        sc.scheduler_cls, cc.block_size, chunked, _on(cc.enable_prefix_caching),
        _on(sc.async_scheduling))
    from vllm_dms.engine.validation import install_frontend_check
    install_frontend_check()  # this process builds the front-end that will use this config


# ----------------------------------------------------------------------------- other dtypes
def _route_no_evict(args: Any) -> None:
    """A DMS checkpoint served without dms_fp8 still needs the DMS model (lane zeroed)."""
    if not isinstance(args.model, str) or not os.path.isdir(args.model):
        return
    if not has_dms_fields(args.model):
        return
    # Never serve a DMS checkpoint as a plain model (its decision lane would stay live in
    # attention), and never let the DMS model class fail later in the worker: validate here.
    why = (f"{args.model} has DMS fields, so --kv-cache-dtype {args.kv_cache_dtype} serves it "
           "with the DMS model in no-evict mode (decision lane zeroed), which needs them valid; "
           "fix the checkpoint, or remove its dms_* fields / dms_metadata.json if it was not "
           "trained with DMS")
    archs, arch = _checkpoint_arch(args.model, args.hf_overrides)
    if arch is None:
        raise DMSConfigError(f"{why}. Its architectures={archs!r} are not supported by DMS "
                             f"(supported: {sorted(SUPPORTED_ARCHS)}), so the decision lane "
                             "cannot be zeroed")
    overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else None
    try:
        DMSConfig.from_checkpoint(args.model, overrides, compact=False)
    except DMSConfigError as e:
        raise DMSConfigError(f"{e} ({why})") from None
    target = DMS_ARCHITECTURES[arch]
    args.hf_overrides = _route(args.hf_overrides, target)
    _logger().info(
        "vllm_dms: %s is a DMS checkpoint served with --kv-cache-dtype %s: using %s in no-evict "
        "mode (DMS lane zeroed, no token evicted); pass --kv-cache-dtype %s for the compact "
        "DMS cache", args.model, args.kv_cache_dtype, target, DMS_DTYPE)


def _checkpoint_arch(model_dir: str, hf_overrides: Any) -> tuple[list, str | None]:
    """(architectures, the DMS arch they map to or None)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    if isinstance(hf_overrides, dict):
        hf.update(hf_overrides)
    archs = hf.get("architectures") or []
    return archs, next((SUPPORTED_ARCHS[a] for a in archs if a in SUPPORTED_ARCHS), None)


# ----------------------------------------------------------------------------- helpers
def _route(hf_overrides: Any, architecture: str) -> Any:
    """hf_overrides with architectures set to the DMS class (dict or callable form)."""
    if callable(hf_overrides):
        def composed(hf_config):
            hf_config = hf_overrides(hf_config)
            hf_config.architectures = [architecture]
            return hf_config
        return composed
    return {**(hf_overrides or {}), "architectures": [architecture]}


def _on(flag: Any) -> str:
    return "on" if flag else "off"


def _scheduler_path(async_scheduling: Any) -> str:
    return ASYNC_SCHEDULER_PATH if async_scheduling else SCHEDULER_PATH


def _backend_name(backend: Any) -> str:
    return (backend.name if hasattr(backend, "name") else str(backend)).upper()
