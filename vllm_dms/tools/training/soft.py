"""The differentiable DMS forward used in training (soft eviction, straight-through decisions).

Per layer, a = scale * q_lane - offset; with logistic noise n (difference of two Gumbels, seeded
per step) the decision is d = 1[(a + n)/tau > 0] with the straight-through gradient of
p = sigmoid((a + n)/tau). Attention adds log sigmoid(-(a_owner + n)/tau) to every key that is more
than W positions behind the query, where a_owner is the logit of the key's flag owner (token k+1
under shift 1). As tau -> 0 this is exactly the hard visibility rule of vllm_dms.tools.reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import _apply_rope, _rms_norm, _rope_cos_sin, borrowed_heads

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTN_PROJ + MLP_PROJ  # every linear of a decoder layer (LoRA targets)


def logistic_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Difference of two standard Gumbels (= Logistic(0, 1)), from a seeded generator."""
    eps = torch.finfo(torch.float32).tiny
    u = torch.rand((2, *shape), generator=generator, device=device).clamp_min(eps)
    g = -torch.log((-torch.log(u)).clamp_min(eps))
    return g[0] - g[1]


def owner_logits(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """logits [B, T, H] computed at each token -> logit of the flag each key owns (shift 0/1).

    Keys past the end under shift 1 get -inf (never flagged), matching shifted_flags; such a key
    is always inside the window of every query that sees it.
    """
    if shift == 0:
        return logits
    pad = torch.full_like(logits[:, :1], float("-inf"))
    return torch.cat([logits[:, 1:], pad], dim=1)


def soft_dms_bias(noisy: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """noisy (a + n)/tau [B, T, H] -> additive attention bias [B, H, T(query), T(key)] (fp32).

    0 inside the window, log sigmoid(-noisy[owner(k)]) = log P(key kept) beyond it, -inf above
    the diagonal.
    """
    T = noisy.shape[1]
    keep_log = F.logsigmoid(-owner_logits(noisy.float(), shift))  # [B, T, H]
    pos = torch.arange(T, device=noisy.device)
    dist = pos.view(T, 1) - pos.view(1, T)  # query - key
    far = (dist > window).view(1, 1, T, T)
    bias = torch.where(far, keep_log.transpose(1, 2).unsqueeze(2), keep_log.new_zeros(()))
    return bias.masked_fill((dist < 0).view(1, 1, T, T), float("-inf"))


def lane_keep_mask(dms: DMSConfig, device) -> torch.Tensor:
    """[Hq, D] ones, borrowed lanes 0: multiplying by it zeroes them and keeps autograd simple."""
    m = torch.ones(dms.num_q_heads, dms.head_dim, device=device)
    m[borrowed_heads(dms), dms.head_dim - 1] = 0.0
    return m


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.to(w.dtype), w, b)  # runs in the weights' dtype (bf16 or fp32)


def _norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return _rms_norm(x.float(), norm)  # RMSNorm always in fp32


def kd_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in nats, computed in fp32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _layer(h, layer, w: dict, qb, dms: DMSConfig, cos, sin, keep, heads, noise_i, tau: float,
           evict: bool):
    """One decoder layer of the student: (h, straight-through d, clean hard d)."""
    B, T = h.shape[:2]
    Hq, H, D, G = dms.num_q_heads, dms.num_kv_heads, dms.head_dim, dms.group
    attn, mlp = layer.self_attn, layer.mlp
    x = _norm(h, layer.input_layernorm)
    q = _lin(x, w["q_proj"], qb).view(B, T, Hq, D).float()
    k = _lin(x, w["k_proj"], attn.k_proj.bias).view(B, T, H, D).float()
    v = _lin(x, w["v_proj"], attn.v_proj.bias).view(B, T, H, D)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 reads the lane after q_norm
        q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
    a = dms.alpha_scale * q[:, :, heads, D - 1] - dms.alpha_offset  # [B, T, H] fp32
    hard = a.detach() > 0
    noisy = (a if noise_i is None else a + noise_i) / tau
    p = torch.sigmoid(noisy)
    st = (noisy > 0).float() + p - p.detach()  # straight-through estimator
    q = _apply_rope(q * keep, cos, sin) * keep  # zero the lane before and after RoPE
    k = _apply_rope(k, cos, sin)
    cdt = v.dtype
    qh = q.to(cdt).transpose(1, 2)
    kh = k.to(cdt).repeat_interleave(G, 2).transpose(1, 2)
    vh = v.repeat_interleave(G, 2).transpose(1, 2)
    if evict:
        mask = soft_dms_bias(noisy, dms.window, dms.decision_shift)
        mask = mask.repeat_interleave(G, dim=1).to(cdt)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    o = out.transpose(1, 2).reshape(B, T, Hq * D)
    h = h + _lin(o, w["o_proj"], attn.o_proj.bias).float()
    x = _norm(h, layer.post_attention_layernorm)
    up = mlp.act_fn(_lin(x, w["gate_proj"], mlp.gate_proj.bias)) * _lin(x, w["up_proj"],
                                                                         mlp.up_proj.bias)
    h = h + _lin(up, w["down_proj"], mlp.down_proj.bias).float()
    return h, st, hard


def student_forward(model, dms: DMSConfig, ids: torch.Tensor, q_weights, q_biases=None, *,
                    other=None, tau: float = 0.1, noise: torch.Tensor | None = None,
                    evict: bool = True, grad_ckpt: bool = False):
    """Batched DMS training forward of ids [B, T] with per-layer q_proj weights (trainable).

    other: per layer a dict {name: weight} overriding the module weights of the other linears
    (LoRA-merged, trainable), or None. noise [L, B, T, H] or None (noiseless). Matmuls run in the
    weights' dtype, norms, RoPE, the residual stream and the decision logits in fp32.
    grad_ckpt recomputes each layer in backward (activation memory of one layer, not all).
    Returns logits [B, T, V], straight-through decisions [L, B, T, H] (value hard 0/1, gradient of
    the sigmoid) and the clean hard decisions a > 0 [L, B, T, H].
    """
    T, device = ids.shape[1], ids.device
    cos, sin = _rope_cos_sin(model, T, device)
    keep = lane_keep_mask(dms, device)
    heads = borrowed_heads(dms).to(device)
    h = model.model.embed_tokens(ids).float()
    st, hard = [], []
    for i, layer in enumerate(model.model.layers):
        w = {n: getattr(layer.self_attn if n in ATTN_PROJ else layer.mlp, n).weight
             for n in LINEARS}
        w.update(other[i] if other is not None else {})
        w["q_proj"] = q_weights[i]
        qb = None if q_biases is None else q_biases[i]
        nz = None if noise is None else noise[i]
        args = (h, layer, w, qb, dms, cos, sin, keep, heads, nz, tau, evict)
        if grad_ckpt and torch.is_grad_enabled():
            h, s_i, d_i = checkpoint(_layer, *args, use_reentrant=False)
        else:
            h, s_i, d_i = _layer(*args)
        st.append(s_i)
        hard.append(d_i)
    logits = _lin(_norm(h, model.model.norm), model.lm_head.weight, model.lm_head.bias)
    return logits, torch.stack(st), torch.stack(hard)
