"""A reference-shaped view of a loaded vLLM Llama / Qwen3 model: the same tensors, no copies.

``reference_forward`` reads Hugging Face module names (q_proj, gate_proj, ...); vLLM fuses them
(qkv_proj, gate_up_proj). This view slices the fused weights, so the exact reference runs on the
very weights the engine serves, including dummy / synthetic ones that exist nowhere else.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import torch
import torch.nn.functional as F


def _linear(weight: torch.Tensor) -> NS:
    return NS(weight=weight, bias=None)


def _norm(mod: torch.nn.Module) -> NS:
    return NS(weight=mod.weight, variance_epsilon=mod.variance_epsilon)


def _attention(at: torch.nn.Module) -> NS:
    if getattr(at.qkv_proj, "bias", None) is not None:
        raise ValueError("reference_view: QKV bias is not supported (Llama / Qwen3 have none)")
    q, kv, w = at.q_size, at.kv_size, at.qkv_proj.weight
    view = NS(q_proj=_linear(w[:q]), k_proj=_linear(w[q:q + kv]),
              v_proj=_linear(w[q + kv:q + 2 * kv]), o_proj=_linear(at.o_proj.weight),
              head_dim=at.head_dim, q_norm=None, k_norm=None)
    if getattr(at, "q_norm", None) is not None:  # Qwen3
        view.q_norm, view.k_norm = _norm(at.q_norm), _norm(at.k_norm)
    return view


def _mlp(mlp: torch.nn.Module) -> NS:
    gu = mlp.gate_up_proj.weight
    inter = gu.shape[0] // 2  # vLLM stacks [gate; up]
    return NS(gate_proj=_linear(gu[:inter]), up_proj=_linear(gu[inter:]),
              down_proj=_linear(mlp.down_proj.weight), act_fn=F.silu)


def reference_view(vllm_model: torch.nn.Module, hf_config) -> NS:
    """What ``reference_forward`` needs, built over ``vllm_model``'s parameters (TP=1)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    inner = vllm_model.model
    vocab = hf_config.vocab_size  # vLLM pads the vocabulary rows; logits use the real ones
    layers = [NS(self_attn=_attention(layer.self_attn), mlp=_mlp(layer.mlp),
                 input_layernorm=_norm(layer.input_layernorm),
                 post_attention_layernorm=_norm(layer.post_attention_layernorm))
              for layer in inner.layers]
    device = inner.embed_tokens.weight.device
    rotary = LlamaRotaryEmbedding(config=hf_config).to(device)  # fp32 inv_freq, HF rope rules
    return NS(model=NS(embed_tokens=NS(weight=inner.embed_tokens.weight[:vocab]), layers=layers,
                       norm=_norm(inner.norm), rotary_emb=rotary),
              lm_head=_linear(vllm_model.lm_head.weight[:vocab]), config=hf_config)
