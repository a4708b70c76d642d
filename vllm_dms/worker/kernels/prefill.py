"""Exact DMS prefill attention over each request's own tokens (first chunk, positions 0..n-1).

Mask (per kv head h): key k is visible to query t iff k <= t and (t - k <= W or not f[k, h]).
The G = Hq / H query heads of group h share that mask and kv head h, so one program packs
``BLOCK_R // G`` tokens x G heads into the rows of one tile and loads each K/V tile once.
Online softmax in fp32 (base 2), bf16 in and out.

Keys wholly behind every row's window are visible iff unflagged, so they are not scanned: a
per-head survivor list (``survivor_index``: the token indices of the unflagged keys, and prefix
counts to find each query tile's share) is gathered tile by tile, with no mask at all. Only the
band of tiles near the diagonal (about W + TM keys) pays for the causal + window + flag mask.
At eviction rate e the attention work drops from ~n/2 to ~(1-e) n/2 + W keys per query.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_dms.worker.kernels.common import _check, _dot, _drop_carrier

LOG2E = 1.4426950408889634
# CUDA tiles (BLOCK_R rows, BLOCK_N keys, warps, stages) by head_dim bound; benchmarks/
# kernel_bench.py sweeps alternatives. H200 2026-12-04, 8K tokens, cr 8, G=4, survivor lists:
# 64x64/4 warps/3 stages 471 us (D=64) and 801 us (D=128), against 609 / 938 us for the
# 128x128/8/2 tile used before (kernel-bench-2026-12-04.json).
CUDA_TILES = {128: (64, 64, 4, 3), 256: (64, 64, 8, 2)}


def attention_tiles(D: int, G: int, cuda: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, TM tokens per tile, BLOCK_N, warps, stages) of the prefill / chunk kernels."""
    # interpreter: small tiles keep numpy fast
    block_r, block_n, warps, stages = CUDA_TILES[128 if D <= 128 else 256] if cuda else \
        (16, 16, 4, 1)
    block_r = max(block_r, triton.next_power_of_2(G))
    return block_r, block_r // G, block_n, warps, stages


@triton.jit
def _query_tile(q_ptr, start, n, m_lo, h, sqt, sqh, G: tl.constexpr, TM: tl.constexpr,
                D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                CARRIER: tl.constexpr):
    # TM tokens x G query heads of kv head h packed into BLOCK_R rows (token-major)
    rr = tl.arange(0, BLOCK_R)
    t = m_lo + rr // G          # (request-local) token of each row
    hq = h * G + rr % G         # query head of each row
    row_ok = (rr < TM * G) & (t < n)
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    tok = (start + t).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * sqt + hq[:, None] * sqh + dd[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0)
    q = _drop_carrier(q, rr % G == 0, dd, D, CARRIER)
    return q, t, hq, row_ok, tok, dd, dm


@triton.jit
def _store_rows(out_ptr, acc, l_i, tok, hq, row_ok, dd, dm, sot, soh):
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that saw no key stay 0
    tl.store(out_ptr + tok[:, None] * sot + hq[:, None] * soh + dd[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dm[None, :])


@triton.jit
def _online_step(q, kx, vx, vis, m_i, l_i, acc, qk_scale, F32: tl.constexpr):
    # one key tile of the online softmax (base 2); vis broadcasts to [BLOCK_R, BLOCK_N]
    s = tl.where(vis, _dot(q, tl.trans(kx), F32) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p, vx, F32)
    return m_new, l_i, acc


def survivor_index(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flags [T, H] bool -> (surv int32 [H, T + 1]: token index of head h's j-th unflagged key,
    in token order (tail unused); cum int32 [H, T + 1]: head h's unflagged keys among [0, i)).
    On the flags' device, no host sync (a few small ops per layer and prefill step)."""
    T, H = flags.shape
    keep = ~flags.t()
    cum = torch.zeros(H, T + 1, dtype=torch.int32, device=flags.device)
    torch.cumsum(keep, dim=1, dtype=torch.int32, out=cum[:, 1:])
    dest = torch.where(keep, cum[:, :-1], T).long()  # flagged keys land in a spare column
    tok = torch.arange(T, dtype=torch.int32, device=flags.device).expand(H, T)
    surv = torch.zeros(H, T + 1, dtype=torch.int32, device=flags.device)
    surv.scatter_(1, dest, tok)
    return surv, cum


@triton.jit
def _attend_own_keys(q, k_ptr, v_ptr, flags, surv, cum, T, start, n, m_lo, t, h, dd, dm,
                     skt, skh, svt, svh, sft, sfh, W, qk_scale, m_i, l_i, acc,
                     TM: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr):
    # Keys of the request's own in-flight tokens [0, min(m_lo + TM, n)) for query rows t.
    nn = tl.arange(0, BLOCK_N)
    kbase = k_ptr + h * skh + dd[None, :]
    vbase = v_ptr + h * svh + dd[None, :]
    # far keys [0, far_end): causal and out of every row's window, so visible iff unflagged:
    # walk head h's survivor list (surv, cum [H, T + 1]; token indices as k_ptr's)
    far_end = tl.maximum(m_lo - W, 0) // BLOCK_N * BLOCK_N
    j_lo = tl.load(cum + h * (T + 1) + start)
    j_hi = tl.load(cum + h * (T + 1) + start + far_end)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        jj = j0 + nn
        jm = jj < j_hi
        ktok = tl.load(surv + h * (T + 1) + jj, mask=jm, other=0).to(tl.int64)
        km = jm[:, None] & dm[None, :]
        kx = tl.load(kbase + ktok[:, None] * skt, mask=km, other=0.0)
        vx = tl.load(vbase + ktok[:, None] * svt, mask=km, other=0.0)
        m_i, l_i, acc = _online_step(q, kx, vx, jm[None, :], m_i, l_i, acc, qk_scale, F32)
    # near tiles: causal + window + flags
    m_hi = tl.minimum(m_lo + TM, n)  # exclusive: causal bound of the tile
    for c0 in range(far_end, m_hi, BLOCK_N):
        kk = c0 + nn
        k_ok = kk < m_hi
        ktok = (start + kk).to(tl.int64)
        f = tl.load(flags + ktok * sft + h * sfh, mask=k_ok, other=1)
        km = k_ok[:, None] & dm[None, :]
        kx = tl.load(kbase + ktok[:, None] * skt, mask=km, other=0.0)
        vx = tl.load(vbase + ktok[:, None] * svt, mask=km, other=0.0)
        vis = (kk[None, :] <= t[:, None]) & k_ok[None, :] & (
            (t[:, None] - kk[None, :] <= W) | (f[None, :] == 0))
        m_i, l_i, acc = _online_step(q, kx, vx, vis, m_i, l_i, acc, qk_scale, F32)
    return m_i, l_i, acc


@triton.jit
def _prefill_attn_kernel(q_ptr, k_ptr, v_ptr, flags, surv, cum, T, cu, out_ptr,
                         sqt, sqh, skt, skh, svt, svh, sft, sfh, sot, soh, W, qk_scale,
                         G: tl.constexpr, TM: tl.constexpr, D: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         F32: tl.constexpr, CARRIER: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(cu + b)
    n = tl.load(cu + b + 1) - start
    m_lo = pid_m * TM
    if m_lo < n:
        q, t, hq, row_ok, tok, dd, dm = _query_tile(q_ptr, start, n, m_lo, h, sqt, sqh, G, TM,
                                                 D, BLOCK_R, BLOCK_D, CARRIER)
        m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)  # finite: padded rows never make NaN
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        m_i, l_i, acc = _attend_own_keys(q, k_ptr, v_ptr, flags, surv, cum, T, start, n, m_lo,
                                         t, h, dd, dm,
                                         skt, skh, svt, svh, sft, sfh, W, qk_scale,
                                         m_i, l_i, acc, TM, BLOCK_N, F32)
        _store_rows(out_ptr, acc, l_i, tok, hq, row_ok, dd, dm, sot, soh)


def dms_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flags: torch.Tensor,
                          cu_seqlens: torch.Tensor, max_seqlen: int, window: int, scale: float,
                          out: torch.Tensor, carrier: bool = False,
                          index: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """DMS-masked causal attention of each request over its own tokens; writes ``out``.

    carrier: q's borrowed lanes (head h*G, lane D-1) hold decisions; read as 0.
    index: survivor_index(flags), when the caller already has it (the pack uses it too).
    q [T, Hq, D], k/v [T, H, D], out [T, Hq, D]: bf16, last dim contiguous (token/head strides
    free). flags [T, H] bool (shifted: the flag each key owns). cu_seqlens int32 [B+1];
    max_seqlen >= every request length (host int, sizes the grid).
    """
    T, Hq, D = q.shape
    H = k.shape[1]
    dev = q.device
    assert Hq % H == 0, f"Hq={Hq} not a multiple of H={H}"
    G = Hq // H
    _check(q, "q", torch.bfloat16, (T, Hq, D), dev, last_contig=True)
    _check(k, "k", torch.bfloat16, (T, H, D), dev, last_contig=True)
    _check(v, "v", torch.bfloat16, (T, H, D), dev, last_contig=True)
    _check(out, "out", torch.bfloat16, (T, Hq, D), dev, last_contig=True)
    _check(flags, "flags", torch.bool, (T, H), dev)
    _check(cu_seqlens, "cu_seqlens", torch.int32, (None,), dev)
    assert window >= 1 and D >= 16, (window, D)
    B = cu_seqlens.shape[0] - 1
    if B <= 0 or T == 0 or max_seqlen <= 0:
        return
    block_r, tm, block_n, warps, stages = attention_tiles(D, G, q.is_cuda)
    fl = flags.view(torch.uint8)
    surv, cum = survivor_index(flags) if index is None else index
    grid = (triton.cdiv(max_seqlen, tm), B, H)
    _prefill_attn_kernel[grid](
        q, k, v, fl, surv, cum, T, cu_seqlens, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        fl.stride(0), fl.stride(1), out.stride(0), out.stride(1), window, scale * LOG2E,
        G=G, TM=tm, D=D, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D),
        F32=not q.is_cuda, CARRIER=carrier, num_warps=warps, num_stages=stages)
