"""Split-K grouped decode attention over the compact DMS arena.

Stage 1, grid (B, H, NS): a program loads the G query heads of group h (padded to >= 16 rows so
tl.dot applies), walks its contiguous share of the row's sub-pages (share = cdiv(npages, NS)),
gathers K/V slot by slot through row_pages, and writes fp32 partials (m in base-2 units, l,
unnormalised acc); an empty share writes m = -inf, l = 0, acc = 0.
Stage 2, grid (B, Hq): merges the NS partials with LSE rescaling into bf16 ``out``; rows with no
live key (slot <= 0, empty row) get zeros. With NS = 1 stage 1 writes ``out`` itself (DIRECT)
and stage 2 is not launched.
The live set is exactly row slots [0, row_len): no per-key mask is needed beyond the length.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.worker.kernels.common import (_check, _dot, _drop_carrier, _kv_byte_off, _load_kv,
                                            arena_words, state_word_offsets)

LOG2E = 1.4426950408889634


class DecodeWorkspace(NamedTuple):
    acc: torch.Tensor  # fp32 [max_batch, Hq, NS, D]
    m: torch.Tensor    # fp32 [max_batch, Hq, NS]
    l: torch.Tensor    # fp32 [max_batch, Hq, NS]


# Split-K programs per (request, KV head): about 256 programs in all (two per SM of an H200's
# 132) by the graph-replayed sweep of benchmarks/kernel_bench.py (2026-12-04, 8K context, cr 8,
# H=8): c=8 best at 4 splits (12.1 us vs 12.3 at 16), c=32 at 2 (27.7 vs 36.6, Llama shape;
# Qwen3 shape 59.8 vs 68.8). A function of the batch size alone, so each CUDA graph size keeps
# its own count.
DECODE_PROGRAMS = 256


def decode_splits(batch: int, num_kv_heads: int, max_splits: int) -> int:
    """Split count for a decode batch: a power of two in [min(2, max_splits), max_splits]."""
    want = max(1, DECODE_PROGRAMS // max(1, batch * num_kv_heads))
    return max(min(2, max_splits), min(max_splits, 1 << (want.bit_length() - 1)))


def decode_tiles(D: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_N, warps, stages) of the split kernel."""
    if not cuda:
        return 16, 4, 1  # interpreter: small tiles keep numpy fast
    # H200, D=128, B=64 x 4096 live FP8: BLOCK_N 128 -> 250 us, 64 -> 268 us, 32 -> 310 us
    return (128, 4, 3) if D <= 128 else (64, 4, 3)


def workspace_for(ws: "DecodeWorkspace", batch: int, splits: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous [batch, Hq, splits(, D)] views at the start of a larger workspace."""
    rows, Hq, max_splits, D = ws.acc.shape
    assert batch <= rows and 1 <= splits <= max_splits, (batch, splits, ws.acc.shape)
    n = batch * Hq * splits
    return (ws.acc.view(-1)[:n * D].view(batch, Hq, splits, D),
            ws.m.view(-1)[:n].view(batch, Hq, splits), ws.l.view(-1)[:n].view(batch, Hq, splits))


def decode_workspace(max_batch: int, Hq: int, D: int, num_splits: int,
                     device: torch.device | str) -> DecodeWorkspace:
    """Preallocate the split-K scratch once (outside graph capture)."""
    assert max_batch >= 1 and num_splits >= 1
    return DecodeWorkspace(
        torch.empty(max_batch, Hq, num_splits, D, dtype=torch.float32, device=device),
        torch.empty(max_batch, Hq, num_splits, dtype=torch.float32, device=device),
        torch.empty(max_batch, Hq, num_splits, dtype=torch.float32, device=device))


@triton.jit
def _decode_split_kernel(q_ptr, arena, o_len, o_pages, slots, ws_acc, ws_m, ws_l, out_ptr,
                         sqb, sqh, sab, sah, sas, smb, smh, sob, soh, H, MAXP, NS, qk_scale,
                         G: tl.constexpr, GP: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                         ELEM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         F32: tl.constexpr, CARRIER: tl.constexpr, DIRECT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    data = arena.to(tl.pointer_type(tl.uint8))
    row_len = arena + o_len
    row_pages = arena + o_pages
    slot = tl.load(slots + b)
    rh = slot * H + h
    ln = tl.load(row_len + rh, mask=slot > 0, other=0)  # padding rows read as empty
    share = ((ln + P - 1) // P + NS - 1) // NS * P  # slots per split, whole sub-pages
    lo = s * share
    hi = tl.minimum(lo + share, ln)
    gg = tl.arange(0, GP)
    dd = tl.arange(0, BLOCK_D)
    gm = gg < G
    dm = dd < D
    q = tl.load(q_ptr + b * sqb + (h * G + gg)[:, None] * sqh + dd[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)
    q = _drop_carrier(q, gg == 0, dd, D, CARRIER)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_D], tl.float32)
    nn = tl.arange(0, BLOCK_N)
    for r0 in range(lo, hi, BLOCK_N):
        r = r0 + nn
        rm = r < hi
        pg = tl.load(row_pages + rh * MAXP + r // P, mask=rm, other=0)
        kb = _kv_byte_off(pg, r % P, P, D, ELEM)[:, None] + dd[None, :] * ELEM
        km = rm[:, None] & dm[None, :]
        kx = _load_kv(data + kb, km, ELEM)
        sc = _dot(q, tl.trans(kx), F32) * qk_scale
        sc = tl.where(rm[None, :], sc, float("-inf"))
        # every tile holds >= 1 live slot, so m_new is finite and no NaN appears
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vx = _load_kv(data + kb + P * D * ELEM, km, ELEM)
        acc = acc * alpha[:, None] + _dot(p, vx, F32)
        m_i = m_new
    hq = h * G + gg
    if DIRECT:  # one split: the program holds the whole row, normalise and write out
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that saw no key: acc is 0
        tl.store(out_ptr + b * sob + hq[:, None] * soh + dd[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
    else:
        tl.store(ws_m + b * smb + hq * smh + s, m_i, mask=gm)
        tl.store(ws_l + b * smb + hq * smh + s, l_i, mask=gm)
        tl.store(ws_acc + b * sab + hq[:, None] * sah + s * sas + dd[None, :], acc,
                 mask=gm[:, None] & dm[None, :])


@triton.jit
def _decode_reduce_kernel(ws_acc, ws_m, ws_l, out_ptr, sab, sah, sas, smb, smh, sob, soh, NS,
                          D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    sm = ss < NS
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    m = tl.load(ws_m + b * smb + hq * smh + ss, mask=sm, other=float("-inf"))
    l = tl.load(ws_l + b * smb + hq * smh + ss, mask=sm, other=0.0)
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # all splits empty: weights become 0
    w = tl.exp2(m - mx)
    tot = tl.sum(w * l, 0)
    a = tl.load(ws_acc + b * sab + hq * sah + ss[:, None] * sas + dd[None, :],
                mask=sm[:, None] & dm[None, :], other=0.0)
    o = tl.sum(w[:, None] * a, 0)
    o = tl.where(tot > 0, o / tl.where(tot > 0, tot, 1.0), 0.0)
    tl.store(out_ptr + b * sob + hq * soh + dd, o.to(out_ptr.dtype.element_ty), mask=dm)


def dms_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, layout: ArenaLayout,
                         slots: torch.Tensor, scale: float, out: torch.Tensor,
                         ws_acc: torch.Tensor, ws_m: torch.Tensor, ws_l: torch.Tensor,
                         carrier: bool = False, tiles: tuple[int, int, int] | None = None) -> None:
    """Attention of one new query per request over its compact rows; writes ``out``.

    carrier: q's borrowed lanes (head h*G, lane D-1) hold decisions, not query values; the
    kernel reads them as 0 (so q needs no clone-and-zero pass).
    q, out [B, Hq, D] bf16 (last dim contiguous); slots int32 [B] (<=0: out = 0);
    ws_acc fp32 [>=B, Hq, NS, D], ws_m / ws_l fp32 [>=B, Hq, NS], contiguous (decode_workspace).
    tiles: (BLOCK_N keys per iteration, warps, pipeline stages) instead of the default
    (``decode_tiles``), for benchmarks/kernel_bench.py's sweep.
    """
    words = arena_words(kv_layer, layout)
    o_len, o_pages = (state_word_offsets(layout)[i] for i in (2, 5))
    dev, H, D = kv_layer.device, layout.num_kv_heads, layout.head_dim
    B, Hq = q.shape[0], q.shape[1]
    assert Hq % H == 0, f"Hq={Hq} not a multiple of H={H}"
    G = Hq // H
    _check(q, "q", torch.bfloat16, (B, Hq, D), dev, last_contig=True)
    _check(out, "out", torch.bfloat16, (B, Hq, D), dev, last_contig=True)
    _check(slots, "slots", torch.int32, (B,), dev)
    NS = ws_acc.shape[2]
    _check(ws_acc, "ws_acc", torch.float32, (None, Hq, NS, D), dev)
    _check(ws_m, "ws_m", torch.float32, (ws_acc.shape[0], Hq, NS), dev)
    _check(ws_l, "ws_l", torch.float32, (ws_acc.shape[0], Hq, NS), dev)
    assert ws_acc.shape[0] >= B, f"workspace holds {ws_acc.shape[0]} rows < batch {B}"
    if B == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_n, warps, stages = tiles or decode_tiles(D, kv_layer.is_cuda)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, f"BLOCK_N {block_n}: a power of 2 >= 16"
    _decode_split_kernel[(B, H, NS)](
        q, words, o_len, o_pages, slots, ws_acc, ws_m, ws_l, out,
        q.stride(0), q.stride(1), ws_acc.stride(0), ws_acc.stride(1), ws_acc.stride(2),
        ws_m.stride(0), ws_m.stride(1), out.stride(0), out.stride(1), H,
        layout.max_pages_per_row, NS, scale * LOG2E,
        G=G, GP=max(16, triton.next_power_of_2(G)), P=layout.block_size, D=D,
        ELEM=layout.elem_bytes, BLOCK_N=block_n, BLOCK_D=block_d, F32=not kv_layer.is_cuda,
        CARRIER=carrier, DIRECT=NS == 1, num_warps=warps, num_stages=stages)
    if NS == 1:
        return
    _decode_reduce_kernel[(B, Hq)](
        ws_acc, ws_m, ws_l, out, ws_acc.stride(0), ws_acc.stride(1), ws_acc.stride(2),
        ws_m.stride(0), ws_m.stride(1), out.stride(0), out.stride(1), NS,
        D=D, BLOCK_S=triton.next_power_of_2(NS), BLOCK_D=block_d, num_warps=4)
