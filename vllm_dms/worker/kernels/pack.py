"""Prefill pack: a first prefill chunk's DMS survivors, densely into empty arena rows.

Key k of an n-token chunk survives the chunk's last query iff ``n-1-k <= W or not f[k]``.
Row (slot, h) gets them in position order at row slots [0, n_keep). Both counts come from the
per-head prefix counts of unflagged keys (``prefill.survivor_index``: ``cum``), so no program
walks the whole prompt:

* ``_reserve_kernel``, grid (B, H): n_keep from ``cum``, pop ceil(n_keep / P) sub-pages, write
  the row's page table, length and counters (or raise the overflow flag; the row stays empty).
* ``_scatter_kernel``, grid (B, H, cdiv(max_len, BLOCK_T)): each token tile finds its first row
  slot from ``cum`` (unflagged keys before it plus flagged in-window keys before it), then writes
  K, V (FP8 or bf16), the meta words and the ring entries of the last W+1 positions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.worker.kernels.common import (FLAG_BIT, _check, _meta_ptr, _pop, _settle, _take_pages,
                                            _write_kv, check_store_args, state_word_offsets)
from vllm_dms.worker.kernels.prefill import survivor_index


@triton.jit
def _kept_before(cum_row, start, t, win_lo):
    # survivors among chunk keys [0, t): unflagged ones plus flagged ones inside the last window
    unf = tl.load(cum_row + start + t) - tl.load(cum_row + start)
    lo = tl.minimum(t, win_lo)
    flagged_in_win = (t - lo) - (unf - (tl.load(cum_row + start + lo) - tl.load(cum_row + start)))
    return unf + flagged_in_win


@triton.jit
def _length(cu, lens, b, start, HAS_LENS: tl.constexpr):
    # the request's own tokens, or (a prefix snapshot) only its first lens[b] of them
    if HAS_LENS:
        return tl.load(lens + b)
    else:
        return tl.load(cu + b + 1) - start


@triton.jit
def _reserve_kernel(arena, o_top, o_stack, o_len, o_npg, o_pages, cum, T, cu, lens, slots,
                    layer_pages, live, overflow, H, W, MAXP, NPROG,
                    P: tl.constexpr, BLOCK_PG: tl.constexpr, HAS_LIVE: tl.constexpr,
                    HAS_LENS: tl.constexpr):
    free_top = arena + o_top
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + b)
    if slot > 0:
        start = tl.load(cu + b)
        n = _length(cu, lens, b, start, HAS_LENS)
        n_keep = _kept_before(cum + h * (T + 1), start, n, tl.maximum(n - 1 - W, 0))
        npg = (n_keep + P - 1) // P
        old = tl.full((), 0, tl.int32)
        ok = npg <= MAXP
        if ok:
            old, ok = _pop(free_top, npg)
        if ok == 0:  # the row stays empty; the scatter sees too few pages and skips it
            tl.store(overflow, 1)
        else:
            rh = slot * H + h
            _take_pages(arena, o_stack, o_pages, rh, MAXP, old, npg, BLOCK_PG)
            tl.store(arena + o_len + rh, n_keep)
            tl.store(arena + o_npg + rh, npg)
            tl.atomic_add(layer_pages + slot, npg)
            if HAS_LIVE:
                tl.atomic_add(live + slot, n_keep)
    _settle(free_top, NPROG)


@triton.jit
def _scatter_kernel(arena, o_npg, o_ring, o_pages, k_ptr, v_ptr, flags, cum, T, cu, lens, slots,
                    skt, skh, svt, svh, sft, sfh, H, W, MAXP,
                    P: tl.constexpr, D: tl.constexpr, ELEM: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    t0 = tl.program_id(2) * BLOCK_T
    slot = tl.load(slots + b)
    start = tl.load(cu + b)
    n = _length(cu, lens, b, start, HAS_LENS)
    if (slot > 0) & (t0 < n):
        cum_row = cum + h * (T + 1)
        win_lo = tl.maximum(n - 1 - W, 0)
        n_keep = _kept_before(cum_row, start, n, win_lo)
        rh = slot * H + h
        if tl.load(arena + o_npg + rh) * P >= n_keep:  # the reservation succeeded
            data = arena.to(tl.pointer_type(tl.uint8))
            tt = t0 + tl.arange(0, BLOCK_T)
            valid = tt < n
            tok = (start + tt).to(tl.int64)
            f = tl.load(flags + tok * sft + h * sfh, mask=valid, other=0)
            in_win = valid & (tt >= win_lo)
            keep = in_win | (valid & (f == 0))
            ki = keep.to(tl.int32)
            r = _kept_before(cum_row, start, t0, win_lo) + tl.cumsum(ki, 0) - ki
            page = tl.load(arena + o_pages + rh * MAXP + r // P, mask=keep, other=0)
            off = r % P
            dd = tl.arange(0, BLOCK_D)
            m2 = keep[:, None] & (dd < D)[None, :]
            _write_kv(data, dd[None, :] * ELEM, page[:, None], off[:, None],
                      k_ptr + tok[:, None] * skt + h * skh + dd[None, :],
                      v_ptr + tok[:, None] * svt + h * svh + dd[None, :], m2, P, D, ELEM)
            meta = tl.where(f != 0, tt | FLAG_BIT, tt)
            tl.store(_meta_ptr(data, page, off, P, D, ELEM), meta, mask=keep)
            tl.store(arena + o_ring + rh * (W + 1) + tt % (W + 1), r, mask=in_win)


def dms_prefill_pack(kv_layer: torch.Tensor, layout: ArenaLayout, k: torch.Tensor,
                     v: torch.Tensor, flags: torch.Tensor, cu_seqlens: torch.Tensor,
                     slots: torch.Tensor, layer_pages: torch.Tensor,
                     overflow: torch.Tensor, live: torch.Tensor | None = None,
                     max_seqlen: int | None = None,
                     cum: torch.Tensor | None = None,
                     lens: torch.Tensor | None = None) -> None:
    """Pack the DMS survivors of each request's first chunk into its (empty) rows.

    k, v [T, H, D] bf16 (last dim contiguous); flags [T, H] bool, already shifted (the flag each
    key owns); cu_seqlens int32 [B+1]; slots int32 [B] (<=0: skip); layer_pages int32 [S1];
    overflow int32 [1] (set to 1 when the free stack cannot serve a row; that row stays empty);
    live int32 [S1] (optional): each packed row adds its survivor count. max_seqlen: host bound
    on the chunk lengths (sizes the grid; default T). cum int32 [H, T+1]: survivor_index(flags)
    prefix counts, when the caller already has them (prefill attention needs the same ones).
    lens int32 [B] (optional): pack only the first lens[b] tokens of request b, as their state
    after token lens[b]-1 (a prefix snapshot into a cache slot; lens[b] <= its length).
    """
    dev, H, D, T = kv_layer.device, layout.num_kv_heads, layout.head_dim, k.shape[0]
    words, B, live_arg = check_store_args(kv_layer, layout, k, v, slots, layer_pages, overflow,
                                          live, T)
    _check(flags, "flags", torch.bool, (T, H), dev)
    _check(cu_seqlens, "cu_seqlens", torch.int32, (B + 1,), dev)
    if cum is None:
        cum = survivor_index(flags)[1]
    _check(cum, "cum", torch.int32, (H, T + 1), dev)
    if lens is not None:
        _check(lens, "lens", torch.int32, (B,), dev)
    max_seqlen = T if max_seqlen is None else max_seqlen
    if B == 0 or T == 0 or max_seqlen <= 0:
        return
    o_top, o_stack, o_len, o_npg, o_ring, o_pages = state_word_offsets(layout)
    P, W, MAXP = layout.block_size, layout.window, layout.max_pages_per_row
    _reserve_kernel[(B, H)](
        words, o_top, o_stack, o_len, o_npg, o_pages, cum, T, cu_seqlens,
        slots if lens is None else lens, slots, layer_pages, live_arg, overflow, H, W, MAXP,
        B * H, P=P, BLOCK_PG=64, HAS_LIVE=live is not None, HAS_LENS=lens is not None,
        num_warps=1)
    block_t = 64 if kv_layer.is_cuda else 16
    fl = flags.view(torch.uint8)
    _scatter_kernel[(B, H, triton.cdiv(max_seqlen, block_t))](
        words, o_npg, o_ring, o_pages, k, v, fl, cum, T, cu_seqlens,
        slots if lens is None else lens, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), fl.stride(0), fl.stride(1),
        H, W, MAXP, P=P, D=D, ELEM=layout.elem_bytes, BLOCK_T=block_t,
        BLOCK_D=triton.next_power_of_2(D), HAS_LENS=lens is not None, num_warps=4)
