"""Fork: copy whole arena rows from one slot to another (the prefix-cache building block).

A DMS row cannot be shared: decode reuses the slot of an expired flagged token in place, so a
cached prefix state is a *copy* (benchmarks/PREFIX_CACHING_DESIGN.md). ``dms_fork_rows`` copies
every (slot, kv head) row of each source slot into an empty destination slot: its live tokens
(row slots [0, len), K/V in the store dtype plus meta words, in the same row order), its length
and its ring of the last W+1 positions (row-slot indices, which the same order keeps valid). The
destination then continues exactly as the source would (decode store, or a continuation chunk).

* ``_reserve_kernel``, grid (B, H): pop ceil(len / P) sub-pages for the destination row, write
  its page table, length and ring (or raise the overflow flag; the row stays empty).
* ``_copy_kernel``, grid (B, H, cdiv(max_len, BLOCK_R)): copy a tile of row slots byte for byte.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.worker.kernels.common import (_check, _pop, _settle, _take_pages, arena_words,
                                            state_word_offsets)


@triton.jit
def _reserve_kernel(arena, o_top, o_stack, o_len, o_npg, o_ring, o_pages, src, dst,
                    layer_pages, live, overflow, H, W, MAXP, NPROG,
                    P: tl.constexpr, BLOCK_PG: tl.constexpr, BLOCK_W: tl.constexpr,
                    HAS_LIVE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(src + b)
    d = tl.load(dst + b)
    if (s > 0) & (d > 0):
        rs, rd = s * H + h, d * H + h
        ln = tl.load(arena + o_len + rs)
        npg = (ln + P - 1) // P
        old, ok = _pop(arena + o_top, npg)
        if ok == 0:  # the row stays empty; the copy sees too few pages and skips it
            tl.store(overflow, 1)
        else:
            _take_pages(arena, o_stack, o_pages, rd, MAXP, old, npg, BLOCK_PG)
            ww = tl.arange(0, BLOCK_W)
            wm = ww < W + 1
            ring = tl.load(arena + o_ring + rs * (W + 1) + ww, mask=wm)
            tl.store(arena + o_ring + rd * (W + 1) + ww, ring, mask=wm)
            tl.store(arena + o_len + rd, ln)
            tl.store(arena + o_npg + rd, npg)
            tl.atomic_add(layer_pages + d, npg)
            if HAS_LIVE:
                tl.atomic_add(live + d, ln)
    _settle(arena + o_top, NPROG)


@triton.jit
def _copy_kernel(arena, o_len, o_npg, o_pages, src, dst, H, MAXP,
                 P: tl.constexpr, SLOT_B: tl.constexpr, KV_B: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_R
    s = tl.load(src + b)
    d = tl.load(dst + b)
    if (s > 0) & (d > 0):
        rs, rd = s * H + h, d * H + h
        ln = tl.load(arena + o_len + rs)
        if (r0 < ln) & (tl.load(arena + o_npg + rd) * P >= ln):  # the reservation succeeded
            data = arena.to(tl.pointer_type(tl.uint8))
            rr = r0 + tl.arange(0, BLOCK_R)
            rm = rr < ln
            ps = tl.load(arena + o_pages + rs * MAXP + rr // P, mask=rm, other=0).to(tl.int64)
            pd = tl.load(arena + o_pages + rd * MAXP + rr // P, mask=rm, other=0).to(tl.int64)
            off = (rr % P).to(tl.int64)
            bb = tl.arange(0, BLOCK_B)
            # one row slot = K bytes | V bytes (P * KV_B apart) | a 4-byte meta word
            for part in tl.static_range(2):
                so = ps * (P * SLOT_B) + part * (P * KV_B) + off * KV_B
                do = pd * (P * SLOT_B) + part * (P * KV_B) + off * KV_B
                m2 = rm[:, None] & (bb < KV_B)[None, :]
                x = tl.load(data + so[:, None] + bb[None, :], mask=m2)
                tl.store(data + do[:, None] + bb[None, :], x, mask=m2)
            words = arena.to(tl.pointer_type(tl.int32))
            ms = (ps * (P * SLOT_B) + 2 * P * KV_B) // 4 + off
            md = (pd * (P * SLOT_B) + 2 * P * KV_B) // 4 + off
            tl.store(words + md, tl.load(words + ms, mask=rm), mask=rm)


def dms_fork_rows(kv_layer: torch.Tensor, layout: ArenaLayout, src_slots: torch.Tensor,
                  dst_slots: torch.Tensor, layer_pages: torch.Tensor, overflow: torch.Tensor,
                  live: torch.Tensor | None = None, max_len: int | None = None) -> None:
    """Copy every row of src_slots[b] into the empty rows of dst_slots[b] (one layer).

    src_slots, dst_slots int32 [B] (a pair with a slot <= 0 is skipped; destinations distinct
    and empty); layer_pages int32 [S1] (destinations gain their sub-pages); overflow int32 [1]
    (set when the free stack cannot serve a row: that row stays empty); live int32 [S1]
    (optional: destinations gain their live counts). max_len: host bound on the source row
    lengths (sizes the grid; default the arena's longest possible row). Capture safe.
    """
    words = arena_words(kv_layer, layout)
    dev, H = kv_layer.device, layout.num_kv_heads
    B = src_slots.shape[0]
    _check(src_slots, "src_slots", torch.int32, (B,), dev)
    _check(dst_slots, "dst_slots", torch.int32, (B,), dev)
    _check(layer_pages, "layer_pages", torch.int32, (layout.num_slots,), dev)
    _check(overflow, "overflow", torch.int32, (1,), dev)
    if live is not None:
        _check(live, "live", torch.int32, (layout.num_slots,), dev)
    P, MAXP = layout.block_size, layout.max_pages_per_row
    max_len = MAXP * P if max_len is None else max_len
    if B == 0 or max_len <= 0:
        return
    o_top, o_stack, o_len, o_npg, o_ring, o_pages = state_word_offsets(layout)
    _reserve_kernel[(B, H)](
        words, o_top, o_stack, o_len, o_npg, o_ring, o_pages, src_slots, dst_slots, layer_pages,
        layer_pages if live is None else live, overflow, H, layout.window, MAXP, B * H,
        P=P, BLOCK_PG=64, BLOCK_W=triton.next_power_of_2(layout.window + 1),
        HAS_LIVE=live is not None, num_warps=1)
    kv_b = layout.head_dim * layout.elem_bytes
    block_r = 64 if kv_layer.is_cuda else 16
    _copy_kernel[(B, H, triton.cdiv(max_len, block_r))](
        words, o_len, o_npg, o_pages, src_slots, dst_slots, H, MAXP, P=P,
        SLOT_B=layout.slot_bytes, KV_B=kv_b, BLOCK_R=block_r,
        BLOCK_B=triton.next_power_of_2(kv_b), num_warps=4)
