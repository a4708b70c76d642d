"""vllm_dms: DMS (Dynamic Memory Sparsification) on a compact FP8 KV cache, as a vLLM plugin.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: dms``) in every process it
starts. It must stay cheap and GPU-free: it only patches config plumbing and registers
lazy string paths; the backend, models and kernels are imported by vLLM when used.
"""
from __future__ import annotations

from vllm_dms.version import REQUIRED_VLLM, __version__

DMS_DTYPE = "dms_fp8"
BACKEND_PATH = "vllm_dms.worker.backend.DMSCompactAttentionBackend"
SCHEDULER_PATH = "vllm_dms.engine.scheduler.DMSScheduler"
ASYNC_SCHEDULER_PATH = "vllm_dms.engine.scheduler.DMSAsyncScheduler"  # with --async-scheduling
# DMSConfig.arch -> architecture name we route DMS checkpoints to.
DMS_ARCHITECTURES = {"llama": "DMSLlamaForCausalLM", "qwen3": "DMSQwen3ForCausalLM"}
MODEL_CLASSES = {
    "DMSLlamaForCausalLM": "vllm_dms.worker.models.llama:DMSLlamaForCausalLM",
    "DMSQwen3ForCausalLM": "vllm_dms.worker.models.qwen3:DMSQwen3ForCausalLM",
}
LOGGER_NAME = "vllm.dms"  # a child of "vllm" so vLLM's handler, format and level apply

__all__ = ["register", "__version__", "DMS_DTYPE"]

_registered = False  # per process; vLLM may call register() several times


def register() -> None:
    """Make ``--kv-cache-dtype dms_fp8`` usable in this process (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True  # also on refusal: log the refusal once, never half-apply later

    import vllm
    from vllm.logger import init_logger

    logger = init_logger(LOGGER_NAME)
    from vllm_dms.version import vllm_version_ok

    if not vllm_version_ok(vllm.__version__):
        logger.error(
            "vllm_dms %s needs vllm==%s but vllm %s is installed: the DMS plugin is disabled "
            "and --kv-cache-dtype %s will be rejected (other KV-cache dtypes are unaffected). "
            "Install vllm==%s to use DMS.",
            __version__, REQUIRED_VLLM, vllm.__version__, DMS_DTYPE, REQUIRED_VLLM)
        return

    from vllm_dms import patches

    if not patches.apply_all(logger):
        return
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    for arch, path in MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, path)  # lazy "module:Class": no import here
    from vllm_dms.engine.spec import register_spec

    register_spec()
