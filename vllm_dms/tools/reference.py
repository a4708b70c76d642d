"""Exact dense reference of DMS attention: the oracle of every correctness test.

Visibility (per layer, per KV head h): key k is visible to query q iff
    k <= q  and  (q - k <= W  or  not f[k, h])
with f[k] = d[k + shift] (shift 1: NVIDIA, the decision computed at token t flags t-1;
shift 0: FastDMS, a token flags itself) and f[k] = 0 where k + shift is past the sequence.
Prompt and decode rows use the same rule.

reference_forward runs that rule through a whole HF Llama / Qwen3 model (teacher-forced, fp32;
dtype=torch.bfloat16 rounds every activation to bf16 as a bf16 engine does, which tells how far
bf16 rounding alone moves a decision logit).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from vllm_dms.engine.config import DMSConfig


def shifted_flags(decisions: torch.Tensor, shift: int) -> torch.Tensor:
    """decisions [T, H] bool (decision computed at each token) -> flags [T, H] owned by each key."""
    assert decisions.dim() == 2 and shift in (0, 1)
    if shift == 0:
        return decisions.clone()
    flags = torch.zeros_like(decisions)
    flags[:-1] = decisions[1:]
    return flags


def dms_mask(flags: torch.Tensor, window: int, queries: torch.Tensor | None = None
             ) -> torch.Tensor:
    """flags [T, H] bool -> visibility mask [H, Q, T(key)] bool, for the query positions
    `queries` [Q] (default: all T; one row is O(T), which keeps long decode checks cheap)."""
    T = flags.shape[0]
    q = (torch.arange(T, device=flags.device) if queries is None
         else queries.to(flags.device)).view(-1, 1)
    k = torch.arange(T, device=flags.device).view(1, T)
    causal = k <= q
    in_window = (q - k) <= window
    keep = ~flags.t().unsqueeze(1)  # [H, 1, T]
    return causal.unsqueeze(0) & (in_window.unsqueeze(0) | keep)


def live_counts(flags: torch.Tensor, window: int) -> torch.Tensor:
    """Number of keys visible to each query: [T, H] int64 (the live-set size after query t)."""
    return dms_mask(flags, window).sum(-1).t()


def dms_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            flags: torch.Tensor, window: int, scale: float,
                            queries: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked attention for one sequence, in fp32.

    q [T, Hq, D], k/v [T, H, D], flags [T, H] -> out [T, Hq, D] (fp32); with `queries` [Q]
    only those rows: out [Q, Hq, D]. The G = Hq / H query heads of group h share KV head h
    and its mask.
    """
    T, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    if queries is not None:
        q = q[queries.to(q.device)]
    mask = dms_mask(flags, window, queries).repeat_interleave(G, dim=0)  # [Hq, Q, T]
    kk = k.float().repeat_interleave(G, dim=1).transpose(0, 1)  # [Hq, T, D]
    vv = v.float().repeat_interleave(G, dim=1).transpose(0, 1)
    s = torch.einsum("hqd,hkd->hqk", q.float().transpose(0, 1), kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,hkd->hqd", p, vv).transpose(0, 1)


# ------------------------------------------------------------------ full-model forward
# A dense, teacher-forced DMS forward over HF Llama / Qwen3 modules. It reads the model's own
# submodules and weights but computes every op itself in fp32, so no transformers attention
# code (or monkeypatch) is involved.

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


@dataclasses.dataclass
class RefOutput:
    logits: torch.Tensor     # [T, V] fp32
    decisions: torch.Tensor  # [L, T, H] bool: decision computed at each token (or injected)
    flags: torch.Tensor      # [L, T, H] bool: evict flag owned by each key (after the shift)
    live: torch.Tensor       # [L, T, H] int64: keys visible to each query under the mask used
    lane_logits: torch.Tensor  # [L, T, H] fp32: scale * lane - offset (> 0: evict), never injected
    # [L, T, H] the lane before q_norm (Qwen3), else the lane: where q_norm saturates the logit
    # (a head holding only the lane), the distance to the threshold is visible only here
    lane_pre: torch.Tensor | None = None


def _linear(x: torch.Tensor, mod: torch.nn.Module, dt: torch.dtype = torch.float32
            ) -> torch.Tensor:
    bias = None if mod.bias is None else mod.bias.to(dt)
    return F.linear(x.to(dt), mod.weight.to(dt), bias).float()


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mlp(x: torch.Tensor, mlp: torch.nn.Module, dt: torch.dtype = torch.float32) -> torch.Tensor:
    act = mlp.act_fn(_linear(x, mlp.gate_proj, dt)) * _linear(x, mlp.up_proj, dt)
    return _linear(act, mlp.down_proj, dt)


def _rope_cos_sin(model: torch.nn.Module, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D] in fp32 from the model's own rotary module (its inv_freq and rope scaling)."""
    rot = model.model.rotary_emb
    if rot.inv_freq.dtype != torch.float32:
        # model.to(bf16) also rounds inv_freq; rebuild the same module class so it is exact fp32
        rot = _fresh_fp32_rotary(rot, device)
    pos = torch.arange(T, device=device).unsqueeze(0)
    cos, sin = rot(torch.zeros(1, dtype=torch.float32, device=device), pos)
    return cos[0].float(), sin[0].float()


def _fresh_fp32_rotary(rot: torch.nn.Module, device) -> torch.nn.Module:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        fresh = type(rot)(copy.deepcopy(rot.config))
    finally:
        torch.set_default_dtype(prev)
    return fresh.to(device)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox (rotate-half) RoPE on x [T, heads, D] with cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """What an e4m3 KV store with scale 1 hands back: clamp to +-448, cast, cast back to fp32."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def project_qkv(x: torch.Tensor, attn: torch.nn.Module, dms: DMSConfig,
                dt: torch.dtype = torch.float32):
    """Normed hidden [T, hidden] -> q [T, Hq, D], k/v [T, H, D] in fp32, q_norm/k_norm applied."""
    return _qk_norm(*_project(x, attn, dms, dt), attn, dt)


def _project(x: torch.Tensor, attn: torch.nn.Module, dms: DMSConfig, dt: torch.dtype):
    """project_qkv before q_norm / k_norm."""
    T, D = x.shape[0], dms.head_dim
    q = _linear(x, attn.q_proj, dt).view(T, dms.num_q_heads, D)
    k = _linear(x, attn.k_proj, dt).view(T, dms.num_kv_heads, D)
    v = _linear(x, attn.v_proj, dt).view(T, dms.num_kv_heads, D)
    return q, k, v


def _qk_norm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: torch.nn.Module,
             dt: torch.dtype):
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
        q, k = _round(_rms_norm(q, attn.q_norm), dt), _round(_rms_norm(k, attn.k_norm), dt)
    return q, k, v


def _round(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """x rounded to dt, kept in fp32 (a no-op for fp32)."""
    return x if dt == torch.float32 else x.to(dt).float()


def borrowed_heads(dms: DMSConfig) -> torch.Tensor:
    """Query head that lends its last lane to KV head h: the first head of the group, h*G."""
    return torch.arange(dms.num_kv_heads) * dms.group


def lane_decisions(q: torch.Tensor, dms: DMSConfig) -> torch.Tensor:
    """q [T, Hq, D] before RoPE -> decisions [T, H] bool, compared in fp32."""
    return dms.decisions_from_lane(q[:, borrowed_heads(dms), dms.head_dim - 1])


def _zero_lane(q: torch.Tensor, dms: DMSConfig) -> torch.Tensor:
    q = q.clone()
    q[:, borrowed_heads(dms), dms.head_dim - 1] = 0.0
    return q


@dataclasses.dataclass(frozen=True)
class _Mode:
    evict: bool
    kv_fp8: bool
    zero_lane: bool
    kv_fp8_from: int | None = None  # query rows >= this read FP8 K/V (the engine's decode rows)
    dtype: torch.dtype = torch.float32  # activations rounded to this between ops


def _attention(x, attn, dms, cos, sin, mode: _Mode, injected):
    """One attention block on normed hidden x [T, hidden] -> (out, decisions, flags, live,
    lane logits, lane before q_norm)."""
    dt = mode.dtype
    q, k, v = _project(x, attn, dms, dt)
    pre = q[:, borrowed_heads(dms), dms.head_dim - 1]
    q, k, v = _qk_norm(q, k, v, attn, dt)
    lane = q[:, borrowed_heads(dms), dms.head_dim - 1]
    logits = lane * dms.alpha_scale - dms.alpha_offset  # the rule of decisions_from_lane
    decisions = lane_decisions(q, dms) if injected is None else injected.to(torch.bool)
    if mode.zero_lane:
        q = _zero_lane(q, dms)
    q, k = _round(_apply_rope(q, cos, sin), dt), _round(_apply_rope(k, cos, sin), dt)
    if mode.zero_lane and dms.zero_lane_after_rope:
        q = _zero_lane(q, dms)  # NVIDIA zeroes again: RoPE leaks lane D/2-1 into D-1
    if mode.kv_fp8:
        k, v = fp8_roundtrip(k), fp8_roundtrip(v)
    flags = shifted_flags(decisions, dms.decision_shift)
    # no-evict mode: nothing is flagged for the mask, so it is plain causal attention
    mask_flags = flags if mode.evict else torch.zeros_like(flags)
    scale = dms.head_dim ** -0.5
    out = dms_attention_reference(q, k, v, mask_flags, dms.window, scale)
    if mode.kv_fp8_from is not None and not mode.kv_fp8:
        # prompt rows attend the in-flight bf16 K/V, decode rows read FP8 (FastDMS's convention)
        out8 = dms_attention_reference(q, fp8_roundtrip(k), fp8_roundtrip(v), mask_flags,
                                       dms.window, scale)
        out = torch.cat([out[: mode.kv_fp8_from], out8[mode.kv_fp8_from:]])
    out = _linear(_round(out, dt).reshape(x.shape[0], -1), attn.o_proj, dt)
    return out, decisions, flags, live_counts(mask_flags, dms.window), logits, pre


def _check_model(model: torch.nn.Module, dms: DMSConfig) -> None:
    attn = model.model.layers[0].self_attn
    if len(model.model.layers) != dms.num_layers or attn.head_dim != dms.head_dim:
        raise ValueError(f"model shape does not match DMSConfig ({dms.num_layers} layers, "
                         f"head_dim {dms.head_dim})")
    types = getattr(model.config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise ValueError(f"only full-attention layers are supported, got layer_types={types}")


@torch.no_grad()
def reference_forward(model: torch.nn.Module, dms: DMSConfig, input_ids: torch.Tensor, *,
                      evict: bool = True, injected_decisions: torch.Tensor | None = None,
                      kv_fp8: bool = False, zero_lane: bool = True,
                      kv_fp8_from: int | None = None,
                      dtype: torch.dtype = torch.float32) -> RefOutput:
    """Dense teacher-forced DMS forward of one sequence input_ids [T] (see module docstring).

    evict=False keeps plain causal attention (lane still zeroed when zero_lane). Decisions come
    from the borrowed lane unless injected_decisions [L, T, H] is given. kv_fp8 round-trips
    post-RoPE K and V through e4m3 before attention; kv_fp8_from=P does so only for query rows
    >= P (FastDMS's convention: prompt rows attend bf16 K/V, decode rows read FP8; the dms_fp8
    engine reads FP8 for every row, i.e. kv_fp8=True).
    dtype=torch.bfloat16 rounds matmul inputs/outputs, norms and the residual stream to bf16.
    """
    _check_model(model, dms)
    ids = input_ids.reshape(-1)
    T, device = ids.shape[0], model.lm_head.weight.device
    ids = ids.to(device)
    mode = _Mode(evict=evict, kv_fp8=kv_fp8, zero_lane=zero_lane, kv_fp8_from=kv_fp8_from,
                 dtype=dtype)
    cos, sin = _rope_cos_sin(model, T, device)
    h = model.model.embed_tokens.weight[ids].float()
    per_layer = []
    for i, layer in enumerate(model.model.layers):
        inj = None if injected_decisions is None else injected_decisions[i].to(device)
        out, *rec = _attention(_round(_rms_norm(h, layer.input_layernorm), dtype),
                               layer.self_attn, dms, cos, sin, mode, inj)
        h = _round(h + out, dtype)
        h = _round(h + _mlp(_round(_rms_norm(h, layer.post_attention_layernorm), dtype),
                            layer.mlp, dtype), dtype)
        per_layer.append(rec)
    logits = _linear(_round(_rms_norm(h, model.model.norm), dtype), model.lm_head, dtype)
    dec, flags, live, lane, pre = (torch.stack(list(x)) for x in zip(*per_layer))
    return RefOutput(logits=logits, decisions=dec, flags=flags, live=live, lane_logits=lane,
                     lane_pre=pre)


@torch.no_grad()
def greedy_generate_reference(model: torch.nn.Module, dms: DMSConfig, prompt_ids: torch.Tensor,
                              steps: int, stop_id: int | None = None,
                              **kw) -> tuple[torch.Tensor, RefOutput]:
    """Greedy decode up to `steps` tokens (ending early after `stop_id`) by re-running the full
    forward each step.

    Returns (generated ids, RefOutput over prompt + generated). The forward is causal, so the
    final pass reproduces every step's logits.
    """
    seq = prompt_ids.reshape(-1).cpu()
    start = seq.numel()
    for _ in range(steps):
        nxt = reference_forward(model, dms, seq, **kw).logits[-1].argmax().cpu()
        seq = torch.cat([seq, nxt.view(1)])
        if stop_id is not None and int(nxt) == stop_id:
            break
    return seq[start:], reference_forward(model, dms, seq, **kw)
