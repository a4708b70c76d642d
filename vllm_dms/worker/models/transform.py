"""DMS as a transform of vLLM's stock Llama / Qwen3 modules (no forked model code).

Each attention module's ``rotary_emb`` is wrapped so that, between q_norm (Qwen3) and RoPE, the
borrowed lane (query head h*G, lane D-1) is read and zeroed, RoPE is applied, and then:
* with ``dms_fp8`` the raw pre-RoPE lane value is written back into that lane: it is the decision
  carrier the DMS backend reads (and zeroes) inside the attention op;
* in no-evict mode (a DMS checkpoint served with auto/fp8 KV) the lane is zeroed again, so the
  model runs exactly as trained, just without eviction.
Each attention layer also reports the DMS KV-cache spec instead of the dense one.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from vllm_dms.engine.config import DMSConfig


class DMSRotary(nn.Module):
    def __init__(self, rope: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int,
                 carry: bool):
        super().__init__()
        self.rope = rope
        self.num_heads, self.group, self.head_dim = num_heads, num_heads // num_kv_heads, head_dim
        self.carry = carry

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        T, G, D = q.shape[0], self.group, self.head_dim
        qh = q.view(T, self.num_heads, D)
        lane = qh[:, ::G, D - 1].clone()  # pre-RoPE, after q_norm: what the decision reads
        qh[:, ::G, D - 1] = 0             # zero before RoPE (removes its rotation partner term)
        q, k = self.rope(positions, q, k)
        qh = q.view(T, self.num_heads, D)
        qh[:, ::G, D - 1] = lane if self.carry else 0  # carrier for the backend, or zero again
        return q, k


def _dms_spec_method(dms: DMSConfig):
    def get_kv_cache_spec(self, vllm_config):
        from vllm_dms.engine.spec import DMSCompactSpec
        return DMSCompactSpec(
            block_size=vllm_config.cache_config.block_size, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, dtype=torch.uint8, dms_window=dms.window,
            dms_max_num_seqs=vllm_config.scheduler_config.max_num_seqs)
    return get_kv_cache_spec


def apply_dms_transform(model: nn.Module, dms: DMSConfig, compact: bool) -> int:
    """Wrap every decoder layer's rotary embedding; returns the number of layers transformed."""
    n = 0
    for module in model.modules():
        attn = getattr(module, "attn", None)
        rope = getattr(module, "rotary_emb", None)
        if attn is None or rope is None or isinstance(rope, DMSRotary):
            continue
        nq, nkv, d = module.num_heads, module.num_kv_heads, module.head_dim
        if nq // nkv != dms.group or d != dms.head_dim:
            raise ValueError(f"DMS transform: layer has {nq}/{nkv} heads of dim {d}, config says "
                             f"group {dms.group}, head_dim {dms.head_dim}")
        module.rotary_emb = DMSRotary(rope, nq, nkv, d, carry=compact)
        if compact:
            attn.get_kv_cache_spec = types.MethodType(_dms_spec_method(dms), attn)
        n += 1
    if n != dms.num_layers:
        raise ValueError(f"DMS transform wrapped {n} attention layers, config has {dms.num_layers}")
    return n


def dms_mode(vllm_config) -> tuple[DMSConfig, bool]:
    from vllm_dms.engine.config import dms_config_from_vllm
    return dms_config_from_vllm(vllm_config), vllm_config.cache_config.cache_dtype == "dms_fp8"


class DMSModelMixin:
    """What a DMS model class adds to its stock base: the transform and the synthetic hook."""

    def _dms_init(self, vllm_config) -> None:
        dms, compact = dms_mode(vllm_config)
        apply_dms_transform(self, dms, compact)
        self._hf_config = vllm_config.model_config.hf_config

    def dms_after_dummy_weights(self) -> None:
        if getattr(self._hf_config, "dms_synthetic", None):  # calibrated synthetic checkpoint
            from vllm_dms.tools.synthetic import apply_synthetic_weights
            apply_synthetic_weights(self, self._hf_config)
