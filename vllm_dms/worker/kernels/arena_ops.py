"""Kernels that mutate the compact DMS arena (layout: vllm_dms/engine/arena.py).

* ``arena_state`` / ``arena_init``: named views of one layer tensor, and its one-time reset.
* ``dms_release``: give every sub-page of some rows back to the free stack (pushes only).
* ``dms_decode_store``: one exact DMS decode step per row: flag, evict-by-reuse or append (pops).

Optional ``live`` (int32 [S1], shared by all layers): each launch keeps it equal to the sum of
row_len over the slot's rows with one atomic per row (pack adds n_keep, decode adds 1 on append
and 0 on reuse, release zeroes), so the live KV count reaches the host without reading arenas.

All launch wrappers are CUDA-graph safe: no host syncs and no allocation (only tensor views).
``arena_read_row`` is a host-side debug/test reader and is not capture safe.

The free-stack protocol (pops, debt, settle) and the views are in
``vllm_dms.worker.kernels.common``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.worker.kernels.common import (FLAG_BIT, ArenaState, _check, _live_arg, _meta_ptr,
                                            _pop, _settle, _write_kv, arena_state, arena_words,
                                            check_store_args, state_word_offsets)

__all__ = ["ArenaState", "arena_init", "arena_read_row", "arena_state", "arena_words",
           "dms_decode_store", "dms_release", "state_word_offsets"]


def arena_init(kv_layer: torch.Tensor, layout: ArenaLayout) -> None:
    """Zero the state region and put every data sub-page on the free stack (eager, once)."""
    layout.validate()
    st = arena_state(kv_layer, layout)
    st.words[:layout.state_offsets()["_end"][0]].zero_()
    first, end = layout.first_data_subpage, layout.num_blocks * layout.num_kv_heads
    st.free_stack[:end - first].copy_(
        torch.arange(first, end, dtype=torch.int32, device=kv_layer.device))
    st.free_top[0] = end - first


@triton.jit
def _release_kernel(arena, o_top, o_stack, o_len, o_npg, o_ring, o_pages, slots, layer_pages,
                    live, H, MAXP, BLOCK_PG: tl.constexpr, HAS_LIVE: tl.constexpr):
    free_top = arena + o_top
    free_stack = arena + o_stack
    row_len = arena + o_len
    row_npages = arena + o_npg
    row_pages = arena + o_pages
    r = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + r)
    if slot > 0:
        rh = slot * H + h
        npg = tl.load(row_npages + rh)
        old = tl.atomic_add(free_top, npg)
        pp = tl.arange(0, BLOCK_PG)
        for p0 in range(0, npg, BLOCK_PG):
            m = p0 + pp < npg
            ids = tl.load(row_pages + rh * MAXP + p0 + pp, mask=m)
            tl.store(free_stack + old + p0 + pp, ids, mask=m)
        tl.store(row_len + rh, 0)
        tl.store(row_npages + rh, 0)
        tl.store(layer_pages + slot, 0)
        if HAS_LIVE:
            tl.store(live + slot, 0)  # every layer's launch zeroes it: idempotent


def dms_release(kv_layer: torch.Tensor, layout: ArenaLayout, slots: torch.Tensor,
                layer_pages: torch.Tensor, live: torch.Tensor | None = None) -> None:
    """Push every sub-page of rows (slot, h) for all h back; rows become empty. slot<=0: skip.

    Slots in one call must be distinct. live int32 [S1] (optional): zeroed for the slots.
    """
    words = arena_words(kv_layer, layout)
    _check(slots, "slots", torch.int32, (None,), kv_layer.device)
    _check(layer_pages, "layer_pages", torch.int32, (layout.num_slots,), kv_layer.device)
    live_arg = _live_arg(live, layout, layer_pages)
    if slots.numel() == 0:
        return
    _release_kernel[(slots.numel(), layout.num_kv_heads)](
        words, *state_word_offsets(layout), slots, layer_pages, live_arg, layout.num_kv_heads,
        layout.max_pages_per_row, BLOCK_PG=64, HAS_LIVE=live is not None, num_warps=1)


# ---------------------------------------------------------------------------- decode store
@triton.jit
def _decode_store_kernel(arena, o_top, o_stack, o_len, o_npg, o_ring, o_pages,
                         k_ptr, v_ptr, dec, pos, slots, layer_pages, live, overflow,
                         skb, skh, svb, svh, sdb, sdh, H, W, MAXP, NPROG,
                         a_scale, a_offset,
                         SHIFT: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                         ELEM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LIVE: tl.constexpr,
                         FROM_LANE: tl.constexpr):
    free_top = arena + o_top
    free_stack = arena + o_stack
    row_len = arena + o_len
    row_npages = arena + o_npg
    ring = arena + o_ring
    row_pages = arena + o_pages
    data = arena.to(tl.pointer_type(tl.uint8))
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + b)
    if slot > 0:
        q = tl.load(pos + b)
        if FROM_LANE:  # fl(x * scale) > offset  <=>  fl(fl(x * scale) - offset) > 0 (reference)
            x = tl.load(dec + b * sdb + h * sdh).to(tl.float32)
            d = (x * a_scale > a_offset).to(tl.int32)
        else:
            d = tl.load(dec + b * sdb + h * sdh).to(tl.int32)
        W1 = W + 1
        rh = slot * H + h
        ring_row = ring + rh * W1
        pages_row = row_pages + rh * MAXP
        if SHIFT == 1:
            if q >= 1:  # (a) the decision at q is the flag of token q-1
                rs = tl.load(ring_row + (q - 1) % W1)
                mp = _meta_ptr(data, tl.load(pages_row + rs // P), rs % P, P, D, ELEM)
                mv = tl.load(mp)
                tl.store(mp, tl.where(d != 0, mv | FLAG_BIT, mv & 0x7FFFFFFF))
        # (b) token e = q-W-1 leaves the window now: reuse its slot iff it is flagged
        e = q - W - 1
        has_e = e >= 0
        rs_e = tl.load(ring_row + q % W1, mask=has_e, other=0)
        pg_e = tl.load(pages_row + rs_e // P, mask=has_e, other=0)
        meta_e = tl.load(_meta_ptr(data, pg_e, rs_e % P, P, D, ELEM), mask=has_e, other=0)
        reuse = has_e & (meta_e < 0)
        ln = tl.load(row_len + rh)
        npg = tl.load(row_npages + rh)
        target = tl.where(reuse, rs_e, ln)
        need_page = (reuse == 0) & (ln >= npg * P)
        fail = tl.full((), 0, tl.int32)
        popped = tl.full((), 0, tl.int32)
        if need_page:
            if npg >= MAXP:
                fail += 1
            else:
                old, ok = _pop(free_top, 1)
                if ok:
                    popped = tl.load(free_stack + old - 1)
                else:
                    fail += 1
        if fail != 0:
            tl.store(overflow, 1)
        else:
            if need_page:
                tl.store(pages_row + npg, popped)
                tl.store(row_npages + rh, npg + 1)
                tl.atomic_add(layer_pages + slot, 1)
            # a fresh page is not read back from row_pages (same-program visibility)
            pg_t = tl.load(pages_row + target // P, mask=need_page == 0, other=0)
            pg_t = tl.where(need_page, popped, pg_t)
            off_t = target % P
            dd = tl.arange(0, BLOCK_D)
            dm = dd < D
            _write_kv(data, dd * ELEM, pg_t, off_t, k_ptr + b * skb + h * skh + dd,
                      v_ptr + b * svb + h * svh + dd, dm, P, D, ELEM)
            own = d * (1 - SHIFT)  # shift 0: a token owns its own decision
            tl.store(_meta_ptr(data, pg_t, off_t, P, D, ELEM), tl.where(own != 0, q | FLAG_BIT, q))
            tl.store(ring_row + q % W1, target)
            tl.store(row_len + rh, tl.where(reuse, ln, ln + 1))
            if HAS_LIVE:
                tl.atomic_add(live + slot, tl.where(reuse, 0, 1))  # branch-free: one per row
    _settle(free_top, NPROG)


def dms_decode_store(kv_layer: torch.Tensor, layout: ArenaLayout, k: torch.Tensor,
                     v: torch.Tensor, dec: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                     shift: int, layer_pages: torch.Tensor, overflow: torch.Tensor,
                     live: torch.Tensor | None = None,
                     alpha: tuple[float, float] | None = None) -> None:
    """One exact DMS decode step per (request, kv head) at query position q = pos[b]:
    (a) shift 1: token q-1 gets flag dec; (b) token q-W-1 leaves the window: its row slot is
    reused iff it is flagged, else the token is appended (popping a sub-page when the row is
    full); (c) K, V, meta (q | (shift 0 ? dec : 0) << 31) and ring[q % (W+1)] are written.

    k, v [B, H, D] bf16 (last dim contiguous); dec [B, H] bool (decision at the new token), or
    with alpha = (scale, offset) the raw carrier lanes [B, H] bf16 (any strides, e.g. the view
    q[:, ::G, D-1]): decision = fp32(lane) * scale - offset > 0, as DMSConfig.decisions_from_lane;
    pos int32 [B]; slots int32 [B] (<=0: skip); shift 0 or 1; layer_pages int32 [S1];
    overflow int32 [1]: set when a row needs a sub-page it cannot get; that row's new token is
    then not stored (step (a) has still been applied). live int32 [S1] (optional): +1 per
    appended row (a reused slot keeps the count).
    """
    assert shift in (0, 1), f"shift must be 0 or 1, got {shift!r}"
    dev, H, D = kv_layer.device, layout.num_kv_heads, layout.head_dim
    words, B, live_arg = check_store_args(kv_layer, layout, k, v, slots, layer_pages, overflow,
                                          live, slots.shape[0])
    if alpha is None:
        _check(dec, "dec", torch.bool, (B, H), dev)
        dv, a_scale, a_offset = dec.view(torch.uint8), 1.0, 0.0
    else:
        _check(dec, "dec (carrier lanes)", torch.bfloat16, (B, H), dev, any_strides=True)
        dv, (a_scale, a_offset) = dec, alpha
        assert a_scale > 0, f"alpha scale must be > 0, got {a_scale}"
    _check(pos, "pos", torch.int32, (B,), dev)
    if B == 0:
        return
    _decode_store_kernel[(B, H)](
        words, *state_word_offsets(layout), k, v, dv, pos, slots, layer_pages, live_arg,
        overflow,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), dv.stride(0), dv.stride(1),
        H, layout.window, layout.max_pages_per_row, B * H, float(a_scale), float(a_offset),
        SHIFT=shift, P=layout.block_size, D=D, ELEM=layout.elem_bytes,
        BLOCK_D=triton.next_power_of_2(D), HAS_LIVE=live is not None, FROM_LANE=alpha is not None,
        num_warps=1)


def arena_read_row(kv_layer: torch.Tensor, layout: ArenaLayout, slot: int, h: int) -> dict:
    """Row (slot, h) decoded on the host (debug/test aid: syncs, not capture safe).

    Returns k, v fp32 [L, D], pos int64 [L], flag bool [L] in row-slot order, and pages. Only
    the row's bytes are gathered (on the arena's device) and copied, never the whole layer.
    """
    st = arena_state(kv_layer, layout)
    P, D, E = layout.block_size, layout.head_dim, layout.elem_bytes
    dev = st.data.device
    pages = st.row_pages[slot, h, :int(st.row_npages[slot, h])].long()
    r = torch.arange(int(st.row_len[slot, h]), device=dev)
    base, off = pages[r // P] * layout.subpage_bytes, r % P
    sdt = torch.float8_e4m3fn if E == 1 else torch.bfloat16
    kidx = (base + off * D * E)[:, None] + torch.arange(D * E, device=dev)
    midx = (base + 2 * P * D * E + off * 4)[:, None] + torch.arange(4, device=dev)
    meta = st.data[midx].cpu().view(torch.int32)[:, 0].long()
    return dict(k=st.data[kidx].cpu().view(sdt).float(),
                v=st.data[kidx + P * D * E].cpu().view(sdt).float(),
                pos=meta & 0x7FFFFFFF, flag=meta < 0, pages=pages.cpu().tolist())
