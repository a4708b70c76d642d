"""Run stock vLLM 0.26.0 engines with ``dms_fp8`` on a CPU-only machine (tests only).

The CUDA wheel of vLLM finds no platform here, and its CPU worker calls a few ``torch.ops._C``
ops that only a CPU build of vLLM compiles. ``apply()`` (idempotent) fills exactly those gaps so
that vLLM's own engine core, CPU worker and model runner (the V1 runner), our DMS model transform,
backend, scheduler and Triton kernels (interpreter) run unchanged:

* vLLM's CPU platform, with ``get_attn_backend_cls`` also accepting CUSTOM (the DMS backend; stock
  CPU allows only its own backend);
* torch fallbacks for ``_C.init_cpu_memory_env`` (no-op), ``_C.silu_and_mul`` and
  ``_C.compute_slot_mapping_kernel_impl`` (the block-table slot mapping);
* no pinned memory (there is no CUDA driver); ``TRITON_INTERPRET=1``.

Engines must use ``compilation_config={"custom_ops": ["none"]}`` (vLLM's native torch paths for
RMSNorm / RoPE), ``enforce_eager=True`` and, for the in-process engine, set
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (``ENGINE_KW`` / ``ENV`` below). Dense dtypes do not run
here (CPU attention needs the CPU build's kernels); ``dms_fp8`` does not use them.
"""
from __future__ import annotations

import os

ENV = {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ENGINE_KW = dict(enforce_eager=True, compilation_config={"custom_ops": ["none"]},
                 skip_tokenizer_init=True, dtype="bfloat16")
_applied = False


def _define_ops() -> None:
    import torch
    import torch.nn.functional as F
    have = {name for name in ("init_cpu_memory_env", "silu_and_mul",
                              "compute_slot_mapping_kernel_impl")
            if hasattr(torch.ops._C, name)}
    lib = torch.library.Library("_C", "FRAGMENT")  # noqa: TOR901 (kept alive below)
    if "init_cpu_memory_env" not in have:
        lib.define("init_cpu_memory_env(int[] nodes) -> ()")
        lib.impl("init_cpu_memory_env", lambda nodes: None, "CompositeExplicitAutograd")
    if "silu_and_mul" not in have:
        def silu_and_mul(out, x):
            d = x.shape[-1] // 2
            out.copy_(F.silu(x[..., :d]) * x[..., d:])
        lib.define("silu_and_mul(Tensor! result, Tensor input) -> ()")
        lib.impl("silu_and_mul", silu_and_mul, "CPU")
    if "compute_slot_mapping_kernel_impl" not in have:
        def slot_mapping(qsl, positions, block_table, out, block_size):
            n = int(qsl[-1])
            req = torch.searchsorted(qsl[1:].long(), torch.arange(n), right=True)
            pos = positions[:n].long()
            col = (pos // block_size).clamp_max(block_table.shape[1] - 1)
            out[:n] = block_table[req, col].long() * block_size + pos % block_size
            out[n:] = -1
        lib.define("compute_slot_mapping_kernel_impl(Tensor qsl, Tensor positions, "
                   "Tensor block_table, Tensor! slot_mapping, int block_size) -> ()")
        lib.impl("compute_slot_mapping_kernel_impl", slot_mapping, "CPU")
    globals()["_LIB"] = lib


def apply() -> None:
    global _applied
    if _applied:
        return
    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
    import vllm.platforms as platforms
    import vllm.utils.torch_utils as torch_utils
    from vllm.platforms.cpu import CpuPlatform

    class DMSTestCpuPlatform(CpuPlatform):
        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            from vllm.v1.attention.backends.registry import AttentionBackendEnum
            if selected_backend == AttentionBackendEnum.CUSTOM:
                return AttentionBackendEnum.CUSTOM.get_path()
            return super().get_attn_backend_cls(selected_backend, attn_selector_config,
                                                num_heads)

    platforms._current_platform = DMSTestCpuPlatform()
    torch_utils.PIN_MEMORY = False
    _define_ops()
    _applied = True
