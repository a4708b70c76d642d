"""Exact dense reference of DMS attention: the oracle of every correctness test.

Visibility (per layer, per KV head h): key k is visible to query q iff
    k <= q  and  (q - k <= W  or  not f[k, h])
with f[k] = d[k + shift] (shift 1: NVIDIA, the decision computed at token t flags t-1;
shift 0: FastDMS, a token flags itself) and f[k] = 0 where k + shift is past the sequence.
Prompt and decode rows use the same rule.
"""
from __future__ import annotations

import torch


def shifted_flags(decisions: torch.Tensor, shift: int) -> torch.Tensor:
    """decisions [T, H] bool (decision computed at each token) -> flags [T, H] owned by each key."""
    assert decisions.dim() == 2 and shift in (0, 1)
    if shift == 0:
        return decisions.clone()
    flags = torch.zeros_like(decisions)
    flags[:-1] = decisions[1:]
    return flags


def dms_mask(flags: torch.Tensor, window: int) -> torch.Tensor:
    """flags [T, H] bool -> visibility mask [H, T(query), T(key)] bool."""
    T = flags.shape[0]
    q = torch.arange(T, device=flags.device).view(T, 1)
    k = torch.arange(T, device=flags.device).view(1, T)
    causal = k <= q
    in_window = (q - k) <= window
    keep = ~flags.t().unsqueeze(1)  # [H, 1, T]
    return causal.unsqueeze(0) & (in_window.unsqueeze(0) | keep)


def live_counts(flags: torch.Tensor, window: int) -> torch.Tensor:
    """Number of keys visible to each query: [T, H] int64 (the live-set size after query t)."""
    return dms_mask(flags, window).sum(-1).t()


def dms_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            flags: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Dense masked attention for one sequence, in fp32.

    q [T, Hq, D], k/v [T, H, D], flags [T, H] -> out [T, Hq, D] (fp32). The G = Hq / H query
    heads of group h share KV head h and its mask.
    """
    T, Hq, D = q.shape
    H = k.shape[1]
    G = Hq // H
    mask = dms_mask(flags, window).repeat_interleave(G, dim=0)  # [Hq, T, T]
    kk = k.float().repeat_interleave(G, dim=1).transpose(0, 1)  # [Hq, T, D]
    vv = v.float().repeat_interleave(G, dim=1).transpose(0, 1)
    s = torch.einsum("hqd,hkd->hqk", q.float().transpose(0, 1), kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,hkd->hqd", p, vv).transpose(0, 1)
