"""Greedy generation under the exact DMS rule, one token at a time with a per-layer K/V cache
(the quality harness's generation agreement and the passkey reference path)."""
from __future__ import annotations

import torch

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import (_apply_rope, _linear, _mlp, _rms_norm, _rope_cos_sin,
                                      _zero_lane, fp8_roundtrip, lane_decisions, project_qkv)


@torch.no_grad()
def greedy_cached(model, dms: DMSConfig, prompt: torch.Tensor, steps: int, *,
                  evict: bool = True, kv_fp8: bool = False) -> torch.Tensor:
    """Greedy decode with a per-layer K/V cache under the reference's visibility rule.

    Same semantics as reference.greedy_generate_reference (one token at a time: at query t a
    key k is visible iff t-k <= W or its flag d[k+shift] is 0; the newest key's flag is 0),
    but O(T) per token instead of a full re-run.
    """
    dev = model.lm_head.weight.device
    seq = prompt.reshape(-1).tolist()
    total = len(seq) + steps
    cos, sin = _rope_cos_sin(model, total, dev)
    L, G, D = dms.num_layers, dms.group, dms.head_dim
    ks, vs, decs = ([[] for _ in range(L)] for _ in range(3))
    out = []
    for t in range(total - 1):
        h = model.model.embed_tokens.weight[seq[t]].float().view(1, -1)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            q, k, v = project_qkv(_rms_norm(h, layer.input_layernorm), attn, dms)
            decs[i].append(lane_decisions(q, dms)[0])
            q = _apply_rope(_zero_lane(q, dms), cos[t:t + 1], sin[t:t + 1])
            k = _apply_rope(k, cos[t:t + 1], sin[t:t + 1])
            if dms.zero_lane_after_rope:
                q = _zero_lane(q, dms)
            if kv_fp8:
                k, v = fp8_roundtrip(k), fp8_roundtrip(v)
            ks[i].append(k[0])
            vs[i].append(v[0])
            K, V = torch.stack(ks[i]), torch.stack(vs[i])  # [t+1, H, D]
            d = torch.stack(decs[i])  # [t+1, H]
            flags = d.clone() if dms.decision_shift == 0 else torch.cat(
                [d[1:], torch.zeros_like(d[:1])])
            dist = (t - torch.arange(t + 1, device=dev)).view(-1, 1)
            vis = (dist <= dms.window) | ~flags if evict else torch.ones_like(flags)
            s = torch.einsum("hd,khd->hk", q[0], K.repeat_interleave(G, 1)) * D ** -0.5
            s = s.masked_fill(~vis.t().repeat_interleave(G, 0), float("-inf"))
            o = torch.einsum("hk,khd->hd", torch.softmax(s, -1), V.repeat_interleave(G, 1))
            h = h + _linear(o.reshape(1, -1), attn.o_proj)
            h = h + _mlp(_rms_norm(h, layer.post_attention_layernorm), layer.mlp)
        if t >= len(seq) - 1:  # past the prompt: the argmax is the next token
            nxt = int(_linear(_rms_norm(h, model.model.norm), model.lm_head).argmax())
            seq.append(nxt)
            out.append(nxt)
    return torch.tensor(out[:steps], dtype=torch.long)


def generation_agreement(model, dms: DMSConfig, prompts: list[torch.Tensor], steps: int) -> dict:
    """Greedy DMS vs no-evict: mean position-wise agreement and mean common-prefix fraction."""
    agree, prefix = [], []
    for p in prompts:
        a = greedy_cached(model, dms, p, steps, evict=True)
        b = greedy_cached(model, dms, p, steps, evict=False)
        same = (a == b).tolist()
        agree.append(sum(same) / steps)
        prefix.append((same.index(False) if False in same else steps) / steps)
    return dict(gen_agreement=sum(agree) / len(agree), gen_prefix_match=sum(prefix) / len(prefix),
                gen_prompts=len(prompts), gen_tokens=steps)
