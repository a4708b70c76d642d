"""Continuation prefill chunks over the compact DMS arena (chunked prefill == one-shot prefill).

A continuation chunk of request b covers positions n0..n1-1 (n1 = n0 + nc) while its rows hold
the DMS live set as of query n0-1 (every token of n0-1-W..n0-1 with its flag, plus the older
unflagged ones). Per layer, in order:

* ``dms_chunk_flag_prev`` (shift 1 only): the chunk's first decision flags token n0-1.
* ``dms_chunk_attention``: query p = n0 + i sees the row's slots whose meta says visible
  (p - pos <= W or not flagged; FP8 decoded as in decode) and chunk keys j <= i under the DMS
  mask (bf16), in one fp32 online softmax.
* ``dms_chunk_pack``: the rows become the live set as of query n1-1. The only arena tokens that
  leave are flagged ring tokens with positions c in [n0-1-W, n1-2-W] (at most min(nc, W+1));
  the chunk's last min(nc, W+1) tokens always survive, so survivors >= holes and a row never
  shrinks: survivors fill the holes (in position order), the rest append at row_len. Pops only.

Pack, per (request, kv head), inside one program separated by barriers: (1) find the holes via
the ring; (2) pop sub-pages; (3) park hole j's row slot in ring[(c_lo + j) % (W+1)] (those
entries belong to positions that are rewritten in (5)); (4) write survivors; (5) rewrite the
ring for the chunk's in-window tokens. tl.debug_barrier (bar.sync) orders the ring scratch
between the program's threads; its re-reads are volatile (no stale L1 lines).
All launch wrappers are capture safe: no host syncs, no allocation (only tensor views).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.worker.kernels.common import (FLAG_BIT, _check, _kv_byte_off, _load_kv,
                                            _meta_ptr, _pop, _settle, _write_kv, arena_words,
                                            check_store_args,
                                            state_word_offsets)
from vllm_dms.worker.kernels.prefill import (LOG2E, _attend_own_keys, _online_step, _query_tile,
                                             _store_rows, attention_tiles, survivor_index)


# ---------------------------------------------------------------------------- flag of n0-1
@triton.jit
def _flag_prev_kernel(arena, o_ring, o_pages, dec, n0_ptr, slots, sdb, sdh, H, W, MAXP,
                      P: tl.constexpr, D: tl.constexpr, ELEM: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    data = arena.to(tl.pointer_type(tl.uint8))
    slot = tl.load(slots + b)
    n0 = tl.load(n0_ptr + b)
    if (slot > 0) & (n0 > 0):
        rh = slot * H + h
        rs = tl.load(arena + o_ring + rh * (W + 1) + (n0 - 1) % (W + 1))
        pg = tl.load(arena + o_pages + rh * MAXP + rs // P)
        mp = _meta_ptr(data, pg, rs % P, P, D, ELEM)
        mv = tl.load(mp)
        d = tl.load(dec + b * sdb + h * sdh)
        tl.store(mp, tl.where(d != 0, mv | FLAG_BIT, mv & 0x7FFFFFFF))


def dms_chunk_flag_prev(kv_layer: torch.Tensor, layout: ArenaLayout, dec_first: torch.Tensor,
                        n0: torch.Tensor, slots: torch.Tensor) -> None:
    """Shift 1: set the flag bit of token n0[b]-1 of rows (slots[b], h) to dec_first[b, h].

    dec_first [B, H] bool (decision at each chunk's first token, any strides); n0 int32 [B];
    slots int32 [B] (<=0, or n0 == 0: skip). Run before dms_chunk_attention / dms_chunk_pack.
    """
    words = arena_words(kv_layer, layout)
    dev, H = kv_layer.device, layout.num_kv_heads
    B = slots.shape[0]
    _check(slots, "slots", torch.int32, (B,), dev)
    _check(n0, "n0", torch.int32, (B,), dev)
    assert dec_first.dtype == torch.bool and tuple(dec_first.shape) == (B, H), (
        f"dec_first: {dec_first.dtype} {tuple(dec_first.shape)}, expected bool {(B, H)}")
    assert dec_first.device == dev, f"dec_first on {dec_first.device}, expected {dev}"
    if B == 0:
        return
    offs = state_word_offsets(layout)
    dv = dec_first.view(torch.uint8)
    _flag_prev_kernel[(B, H)](
        words, offs[4], offs[5], dv, n0, slots, dv.stride(0), dv.stride(1), H, layout.window,
        layout.max_pages_per_row, P=layout.block_size, D=layout.head_dim,
        ELEM=layout.elem_bytes, num_warps=1)


# ---------------------------------------------------------------------------- attention
@triton.jit
def _chunk_attn_kernel(q_ptr, k_ptr, v_ptr, flags, surv, cum, T, cu, n0_ptr, slots, arena,
                       o_len, o_pages,
                       out_ptr, sqt, sqh, skt, skh, svt, svh, sft, sfh, sot, soh,
                       H, W, MAXP, qk_scale,
                       G: tl.constexpr, TM: tl.constexpr, P: tl.constexpr, D: tl.constexpr,
                       ELEM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, F32: tl.constexpr, CARRIER: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(cu + b)
    n = tl.load(cu + b + 1) - start
    m_lo = pid_m * TM
    if m_lo < n:
        data = arena.to(tl.pointer_type(tl.uint8))
        slot = tl.load(slots + b)
        n0 = tl.load(n0_ptr + b)
        q, t, hq, row_ok, tok, dd, dm = _query_tile(q_ptr, start, n, m_lo, h, sqt, sqh, G, TM,
                                                 D, BLOCK_R, BLOCK_D, CARRIER)
        p = n0 + t                  # absolute query position (t: chunk-local)
        m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)  # finite: fully masked tiles give p = 0
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        nn = tl.arange(0, BLOCK_N)
        # (a) the arena row: live slots [0, row_len), visible unless flagged and out of window
        rh = slot * H + h
        ln = tl.load(arena + o_len + rh, mask=(slot > 0) & (n0 > 0), other=0)
        for r0 in range(0, ln, BLOCK_N):
            r = r0 + nn
            rm = r < ln
            pg = tl.load(arena + o_pages + rh * MAXP + r // P, mask=rm, other=0)
            kb = _kv_byte_off(pg, r % P, P, D, ELEM)[:, None] + dd[None, :] * ELEM
            km = rm[:, None] & dm[None, :]
            kx = _load_kv(data + kb, km, ELEM)
            vx = _load_kv(data + kb + P * D * ELEM, km, ELEM)
            meta = tl.load(_meta_ptr(data, pg, r % P, P, D, ELEM), mask=rm, other=0)
            vis = rm[None, :] & ((p[:, None] - (meta & 0x7FFFFFFF)[None, :] <= W) |
                                 (meta >= 0)[None, :])
            m_i, l_i, acc = _online_step(q, kx, vx, vis, m_i, l_i, acc, qk_scale, F32)
        # (b) the chunk's own keys: causal + window + flags (local indices)
        m_i, l_i, acc = _attend_own_keys(q, k_ptr, v_ptr, flags, surv, cum, T, start, n, m_lo,
                                         t, h, dd, dm,
                                         skt, skh, svt, svh, sft, sfh, W, qk_scale,
                                         m_i, l_i, acc, TM, BLOCK_N, F32)
        _store_rows(out_ptr, acc, l_i, tok, hq, row_ok, dd, dm, sot, soh)


def dms_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flags: torch.Tensor,
                        cu_seqlens: torch.Tensor, n0: torch.Tensor, slots: torch.Tensor,
                        kv_layer: torch.Tensor, layout: ArenaLayout, window: int, scale: float,
                        out: torch.Tensor, max_seqlen: int | None = None,
                        carrier: bool = False,
                        index: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Attention of each chunk's queries over its arena rows plus the chunk itself; writes out.

    q, out [T, Hq, D], k/v [T, H, D]: bf16, last dim contiguous. flags [T, H] bool: the flag
    each chunk key owns (shifted within the chunk). cu_seqlens int32 [B+1]; n0 int32 [B]
    (tokens already in the arena; 0 = first chunk: chunk keys only); slots int32 [B] (<=0:
    chunk keys only). max_seqlen: host bound on chunk lengths (sizes the grid; default T).
    carrier: q's borrowed lanes (head h*G, lane D-1) hold decisions; read as 0.
    index: survivor_index(flags), when the caller already has it (the packs use it too).
    """
    words = arena_words(kv_layer, layout)
    T, Hq, D = q.shape
    H, dev = layout.num_kv_heads, q.device
    assert Hq % H == 0 and D == layout.head_dim, (Hq, H, D, layout.head_dim)
    assert window == layout.window, f"window {window} != arena window {layout.window}"
    G = Hq // H
    _check(q, "q", torch.bfloat16, (T, Hq, D), dev, last_contig=True)
    _check(k, "k", torch.bfloat16, (T, H, D), dev, last_contig=True)
    _check(v, "v", torch.bfloat16, (T, H, D), dev, last_contig=True)
    _check(out, "out", torch.bfloat16, (T, Hq, D), dev, last_contig=True)
    _check(flags, "flags", torch.bool, (T, H), dev)
    B = slots.shape[0]
    _check(slots, "slots", torch.int32, (B,), dev)
    _check(n0, "n0", torch.int32, (B,), dev)
    _check(cu_seqlens, "cu_seqlens", torch.int32, (B + 1,), dev)
    assert kv_layer.device == dev, f"kv_layer on {kv_layer.device}, expected {dev}"
    max_seqlen = T if max_seqlen is None else max_seqlen
    if B == 0 or T == 0 or max_seqlen <= 0:
        return
    # the prefill kernel's tiles (arena tiles are gathered like decode's)
    block_r, tm, block_n, warps, stages = attention_tiles(D, G, q.is_cuda)
    o_len, o_pages = (state_word_offsets(layout)[i] for i in (2, 5))
    fl = flags.view(torch.uint8)
    surv, cum = survivor_index(flags) if index is None else index
    _chunk_attn_kernel[(triton.cdiv(max_seqlen, tm), B, H)](
        q, k, v, fl, surv, cum, T, cu_seqlens, n0, slots, words, o_len, o_pages, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        fl.stride(0), fl.stride(1), out.stride(0), out.stride(1),
        H, window, layout.max_pages_per_row, scale * LOG2E,
        G=G, TM=tm, P=layout.block_size, D=D, ELEM=layout.elem_bytes, BLOCK_R=block_r,
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D), F32=not q.is_cuda,
        CARRIER=carrier, num_warps=warps, num_stages=stages)


# ---------------------------------------------------------------------------- pack
@triton.jit
def _chunk_pack_kernel(arena, o_top, o_stack, o_len, o_npg, o_ring, o_pages,
                       k_ptr, v_ptr, flags, cu, n0_ptr, slots, layer_pages, live, overflow,
                       skt, skh, svt, svh, sft, sfh, H, W, MAXP, NPROG,
                       P: tl.constexpr, D: tl.constexpr, ELEM: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                       HAS_LIVE: tl.constexpr):
    free_top = arena + o_top
    free_stack = arena + o_stack
    data = arena.to(tl.pointer_type(tl.uint8))
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + b)
    start = tl.load(cu + b)
    n = tl.load(cu + b + 1) - start
    if (slot > 0) & (n > 0):
        n0 = tl.load(n0_ptr + b)
        W1 = W + 1
        rh = slot * H + h
        ring_row = arena + o_ring + rh * W1
        pages_row = arena + o_pages + rh * MAXP
        ln = tl.load(arena + o_len + rh)
        npg = tl.load(arena + o_npg + rh)
        # (1) holes: flagged arena tokens c in [n0-1-W, n1-2-W] leave the window now
        c_lo = tl.maximum(n0 - W1, 0)
        c_hi = tl.minimum(n0 - 1, n0 + n - W1 - 1)
        ww = tl.arange(0, BLOCK_W)
        c = c_lo + ww
        cv = c <= c_hi
        rs_c = tl.load(ring_row + c % W1, mask=cv, other=0)
        pg_c = tl.load(pages_row + rs_c // P, mask=cv, other=0)
        meta_c = tl.load(_meta_ptr(data, pg_c, rs_c % P, P, D, ELEM), mask=cv, other=0)
        hi = (cv & (meta_c < 0)).to(tl.int32)
        ndrop = tl.sum(hi, 0)
        hrank = tl.cumsum(hi, 0) - hi
        # survivors of the chunk at query n1-1 (its last min(n, W+1) keys always survive)
        tt = tl.arange(0, BLOCK_T)
        n_keep = tl.full((), 0, tl.int32)
        for t0 in range(0, n, BLOCK_T):
            tk = t0 + tt
            valid = tk < n
            f = tl.load(flags + (start + tk).to(tl.int64) * sft + h * sfh, mask=valid, other=0)
            n_keep += tl.sum((valid & ((n - 1 - tk <= W) | (f == 0))).to(tl.int32), 0)
        new_len = ln - ndrop + n_keep  # >= ln: n_keep >= min(n, W+1) >= candidates >= ndrop
        # (2) pop the sub-pages the longer row needs (a row never shrinks: nothing to push)
        need = tl.maximum((new_len + P - 1) // P - npg, 0)
        old = tl.full((), 0, tl.int32)
        ok = npg + need <= MAXP
        if ok:
            old, ok = _pop(free_top, need)
        if ok == 0:  # the row keeps its previous live set
            tl.store(overflow, 1)
        else:
            base_sp = old - need
            for p0 in range(0, need, BLOCK_T):
                pm = p0 + tt < need
                ids = tl.load(free_stack + base_sp + p0 + tt, mask=pm)
                tl.store(pages_row + npg + p0 + tt, ids, mask=pm)
            # (3) park hole j's slot at ring[(c_lo + j) % W1]; phase (5) rewrites those entries
            tl.debug_barrier()
            tl.store(ring_row + (c_lo + hrank) % W1, rs_c, mask=hi != 0)
            tl.debug_barrier()
            dd = tl.arange(0, BLOCK_D)
            dm = dd < D
            # (4) survivor s (position order) -> hole s if s < ndrop, else row slot ln + s - ndrop
            rcount = tl.full((), 0, tl.int32)
            for t0 in range(0, n, BLOCK_T):
                tk = t0 + tt
                valid = tk < n
                tok = (start + tk).to(tl.int64)
                f = tl.load(flags + tok * sft + h * sfh, mask=valid, other=0)
                keep = valid & ((n - 1 - tk <= W) | (f == 0))
                ki = keep.to(tl.int32)
                s = rcount + tl.cumsum(ki, 0) - ki
                to_hole = keep & (s < ndrop)
                hs = tl.load(ring_row + (c_lo + s) % W1, mask=to_hole, other=0, volatile=True)
                target = tl.where(s < ndrop, hs, ln + s - ndrop)
                tp = target // P
                # fresh pages come straight from the popped range (row_pages may not be visible)
                page = tl.load(pages_row + tp, mask=keep & (tp < npg), other=0)
                page = tl.where(tp < npg, page,
                                tl.load(free_stack + base_sp + tp - npg,
                                        mask=keep & (tp >= npg), other=0))
                off = target % P
                _write_kv(data, dd[None, :] * ELEM, page[:, None], off[:, None],
                          k_ptr + tok[:, None] * skt + h * skh + dd[None, :],
                          v_ptr + tok[:, None] * svt + h * svh + dd[None, :],
                          keep[:, None] & dm[None, :], P, D, ELEM)
                pos = n0 + tk
                tl.store(_meta_ptr(data, page, off, P, D, ELEM),
                         tl.where(f != 0, pos | FLAG_BIT, pos), mask=keep)
                rcount += tl.sum(ki, 0)
            # (5) ring of the chunk's in-window tokens (all survivors: rank = n_keep - n + j)
            j = tl.maximum(n - W1, 0) + ww
            jv = j < n
            s = n_keep - n + j
            hs = tl.load(ring_row + (c_lo + s) % W1, mask=jv & (s < ndrop), other=0,
                         volatile=True)
            target = tl.where(s < ndrop, hs, ln + s - ndrop)
            tl.debug_barrier()
            tl.store(ring_row + (n0 + j) % W1, target, mask=jv)
            tl.store(arena + o_len + rh, new_len)
            tl.store(arena + o_npg + rh, npg + need)
            tl.atomic_add(layer_pages + slot, need)
            if HAS_LIVE:
                tl.atomic_add(live + slot, new_len - ln)
    _settle(free_top, NPROG)


def dms_chunk_pack(kv_layer: torch.Tensor, layout: ArenaLayout, k: torch.Tensor,
                   v: torch.Tensor, flags: torch.Tensor, cu_seqlens: torch.Tensor,
                   n0: torch.Tensor, slots: torch.Tensor, layer_pages: torch.Tensor,
                   overflow: torch.Tensor, live: torch.Tensor | None = None) -> None:
    """Bring rows (slots[b], h), holding the live set as of query n0[b]-1, to the live set as of
    the chunk's last query: flagged tokens that leave the window free their slots, the chunk's
    survivors fill them and append (FP8), ring / row_len / row_npages / layer_pages follow.

    k, v [T, H, D] bf16 (last dim contiguous); flags [T, H] bool (as for dms_chunk_attention;
    shift 1: dms_chunk_flag_prev has run); cu_seqlens int32 [B+1]; n0 int32 [B]; slots int32
    [B] (<=0: skip; distinct); layer_pages int32 [S1]; overflow int32 [1]: set when a row needs
    sub-pages it cannot get; that row is left as it was. Pops only (rows never shrink).
    live int32 [S1] (optional, see arena_ops): each packed row adds its growth.
    """
    dev, H, D, T = kv_layer.device, layout.num_kv_heads, layout.head_dim, k.shape[0]
    words, B, live_arg = check_store_args(kv_layer, layout, k, v, slots, layer_pages, overflow,
                                          live, T)
    _check(flags, "flags", torch.bool, (T, H), dev)
    _check(n0, "n0", torch.int32, (B,), dev)
    _check(cu_seqlens, "cu_seqlens", torch.int32, (B + 1,), dev)
    if B == 0:
        return
    fl = flags.view(torch.uint8)
    _chunk_pack_kernel[(B, H)](
        words, *state_word_offsets(layout), k, v, fl, cu_seqlens, n0, slots, layer_pages,
        live_arg, overflow, k.stride(0), k.stride(1), v.stride(0), v.stride(1), fl.stride(0),
        fl.stride(1), H, layout.window, layout.max_pages_per_row, B * H,
        P=layout.block_size, D=D, ELEM=layout.elem_bytes,
        BLOCK_T=64 if kv_layer.is_cuda else 16, BLOCK_W=triton.next_power_of_2(layout.window + 1),
        BLOCK_D=triton.next_power_of_2(D), HAS_LIVE=live is not None, num_warps=4)
