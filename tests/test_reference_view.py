"""reference_view: the reference over vLLM-style fused weights equals it over the HF modules.

The fake engine model below has exactly the attribute names vLLM's Llama / Qwen3 modules use
(qkv_proj with q_size / kv_size, gate_up_proj stacked [gate; up], RMSNorm.variance_epsilon,
padded vocabulary rows), built by fusing a tiny HF model's tensors.
"""
from types import SimpleNamespace as NS

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_reference import dms_for, ids_of, tiny_qwen3
from vllm_dms.tools.reference import reference_forward
from vllm_dms.tools.reference_view import reference_view

PAD = 64  # vLLM pads the vocabulary; the view must drop these rows


def tiny_llama_nobias() -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, vocab_size=211,
                      max_position_embeddings=256,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                       "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    return LlamaForCausalLM(cfg)


def fused_like_vllm(hf) -> NS:
    def norm(m):
        return NS(weight=m.weight, variance_epsilon=m.variance_epsilon)

    def pad(w):
        return torch.cat([w, torch.randn(PAD, w.shape[1])])

    layers = []
    for layer in hf.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        attn = NS(qkv_proj=NS(weight=qkv, bias=None), o_proj=NS(weight=a.o_proj.weight),
                  q_size=a.q_proj.weight.shape[0], kv_size=a.k_proj.weight.shape[0],
                  head_dim=a.head_dim)
        if hasattr(a, "q_norm"):
            attn.q_norm, attn.k_norm = norm(a.q_norm), norm(a.k_norm)
        mlp = NS(gate_up_proj=NS(weight=torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                 down_proj=NS(weight=m.down_proj.weight))
        layers.append(NS(self_attn=attn, mlp=mlp, input_layernorm=norm(layer.input_layernorm),
                         post_attention_layernorm=norm(layer.post_attention_layernorm)))
    return NS(model=NS(embed_tokens=NS(weight=pad(hf.model.embed_tokens.weight)), layers=layers,
                       norm=norm(hf.model.norm)),
              lm_head=NS(weight=pad(hf.lm_head.weight)))


@pytest.mark.parametrize("make", [tiny_llama_nobias, tiny_qwen3])
def test_view_equals_hf_modules(make):
    torch.manual_seed(0)
    hf = make().eval()
    with torch.no_grad():  # lanes large enough to cross the threshold both ways
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    dms = dms_for(hf, window=3)
    view = reference_view(fused_like_vllm(hf), hf.config)
    ids = ids_of(40) % hf.config.vocab_size
    want = reference_forward(hf, dms, ids, kv_fp8_from=30)
    got = reference_forward(view, dms, ids, kv_fp8_from=30)
    assert got.logits.shape == want.logits.shape  # padded vocabulary rows dropped
    assert torch.equal(got.decisions, want.decisions) and want.decisions.any()
    assert not want.decisions.all()
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
