"""Kernels that mutate the compact DMS arena (layout: vllm_dms/engine/arena.py).

* ``arena_state`` / ``arena_init``: named views of one layer tensor, and its one-time reset.
* ``dms_release``: give every sub-page of some rows back to the free stack (pushes only).
* ``dms_prefill_pack`` (``vllm_dms.worker.kernels.pack``, re-exported): a first prefill chunk's DMS
  survivors, densely into empty rows (pops).
* ``dms_decode_store``: one exact DMS decode step per row: flag, evict-by-reuse or append (pops).

Optional ``live`` (int32 [S1], shared by all layers): each launch keeps it equal to the sum of
row_len over the slot's rows with one atomic per row (pack adds n_keep, decode adds 1 on append
and 0 on reuse, release zeroes), so the live KV count reaches the host without reading arenas.

All launch wrappers are CUDA-graph safe: no host syncs and no allocation (only tensor views).
``arena_read_row`` is a host-side debug/test reader and is not capture safe.

Free-stack protocol. Pops: ``old = atomic_add(free_top[0], -n)``, take free_stack[old-n, old).
A failed pop (old < n) is not undone in place: undoing races (with two failures in flight, one
undo lets a concurrent pop succeed below the other's debt, whose undo then frees taken pages).
It adds n to free_top[1] (debt) instead, and the top stays negative for the rest of the launch,
so every later pop of that launch fails too. Every program of a popping launch finally counts
itself in free_top[2]; the last one repays the debt. Between launches words 1 and 2 are 0.
After an overflow, rows of that launch that would have fitted may also be refused (left empty /
unchanged); no row is ever half written and no sub-page is handed out twice.
Pushes (release) are plain atomic_adds and never share a launch with pops.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from vllm_dms.engine.arena import ArenaLayout

FLAG_BIT = tl.constexpr(-2147483648)  # bit 31 of the int32 meta word (constexpr: used in jit code)


@dataclasses.dataclass(frozen=True)
class ArenaState:
    data: torch.Tensor        # uint8 [num_blocks * page_bytes], the whole layer tensor
    words: torch.Tensor       # int32 view of the same bytes
    free_top: torch.Tensor    # int32 [16]; word 0 is the stack height
    free_stack: torch.Tensor  # int32 [NSP]
    row_len: torch.Tensor     # int32 [S1, H]
    row_npages: torch.Tensor  # int32 [S1, H]
    ring: torch.Tensor        # int32 [S1, H, W+1]
    row_pages: torch.Tensor   # int32 [S1, H, MAXP]


def arena_state(kv_layer: torch.Tensor, layout: ArenaLayout) -> ArenaState:
    """Named views of one layer tensor (host-side use: init, tests, debugging)."""
    words = arena_words(kv_layer, layout).view(-1)
    data = words.view(torch.uint8)
    offs = layout.state_offsets()

    def arr(name: str) -> torch.Tensor:
        off, shape = offs[name]
        return words[off:off + math.prod(shape)].view(shape)

    return ArenaState(data, words, arr("free_top"), arr("free_stack"), arr("row_len"),
                      arr("row_npages"), arr("ring"), arr("row_pages"))


STATE_ARRAYS = ("free_top", "free_stack", "row_len", "row_npages", "ring", "row_pages")


@functools.lru_cache(maxsize=None)
def state_word_offsets(layout: ArenaLayout) -> tuple[int, ...]:
    """Word offsets of STATE_ARRAYS (kernels take one int32 base pointer plus these)."""
    assert layout.elem_bytes in (1, 2) and layout.subpage_bytes % 4 == 0, layout
    offs = layout.state_offsets()
    return tuple(offs[n][0] for n in STATE_ARRAYS)


def arena_words(kv_layer: torch.Tensor, layout: ArenaLayout) -> torch.Tensor:
    """Checked int32 view of a layer tensor: one view op, so launch wrappers stay cheap."""
    assert kv_layer.dtype == torch.uint8 and kv_layer.is_contiguous(), (
        f"kv_layer must be contiguous uint8, got {kv_layer.dtype}")
    assert kv_layer.numel() == layout.num_blocks * layout.page_bytes, (
        f"kv_layer has {kv_layer.numel()} B, layout wants {layout.num_blocks * layout.page_bytes}")
    return kv_layer.view(torch.int32)


def arena_init(kv_layer: torch.Tensor, layout: ArenaLayout) -> None:
    """Zero the state region and put every data sub-page on the free stack (eager, once)."""
    layout.validate()
    st = arena_state(kv_layer, layout)
    st.words[:layout.state_offsets()["_end"][0]].zero_()
    first, end = layout.first_data_subpage, layout.num_blocks * layout.num_kv_heads
    st.free_stack[:end - first].copy_(
        torch.arange(first, end, dtype=torch.int32, device=kv_layer.device))
    st.free_top[0] = end - first


# ---------------------------------------------------------------------------- shared jit helpers
@triton.jit
def _kv_byte_off(page, off, P: tl.constexpr, D: tl.constexpr, ELEM: tl.constexpr):
    # int64: a layer tensor may exceed 2 GiB
    return page.to(tl.int64) * (P * (2 * D * ELEM + 4)) + off.to(tl.int64) * (D * ELEM)


@triton.jit
def _meta_ptr(data, page, off, P: tl.constexpr, D: tl.constexpr, ELEM: tl.constexpr):
    base = page.to(tl.int64) * (P * (2 * D * ELEM + 4)) + 2 * P * D * ELEM
    return (data + base).to(tl.pointer_type(tl.int32)) + off


@triton.jit
def _e4m3_bits(x):
    # fp32 -> e4m3fn byte in integer math: round-to-nearest-even, saturate to +-448 (scale 1.0).
    # Exact on every backend (the interpreter's own fp8 cast neither ties to even nor carries).
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    r = a - (120 << 23)  # rebias 127 -> 7; a mantissa carry rolls into the exponent
    norm = (r + 0x7FFFF + ((r >> 20) & 1)) >> 20
    e = a >> 23
    sh = tl.maximum(tl.minimum(141 - e, 30), 1)  # subnormal: m * 2^-9, m = rne(M >> sh)
    mant = (a & 0x7FFFFF) | 0x800000
    qv = mant >> sh
    rem = mant & ((1 << sh) - 1)
    half = 1 << (sh - 1)
    sub = qv + ((rem > half) | ((rem == half) & ((qv & 1) == 1))).to(tl.int32)
    out = tl.where(a < 0x3C800000, sub, norm)  # below 2^-6: subnormal
    out = tl.where(a >= 0x43E00000, 0x7E, out)  # >= 448 and inf saturate
    out = tl.where(a > 0x7F800000, 0x7F, out)  # NaN
    return (out | sign).to(tl.uint8)


@triton.jit
def _to_store(x, ELEM: tl.constexpr):
    if ELEM == 1:
        return _e4m3_bits(x.to(tl.float32))
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _store_ptr(ptr, ELEM: tl.constexpr):
    # byte address -> element pointer of the stored encoding (FP8 is stored as its bits)
    if ELEM == 1:
        return ptr
    else:
        return ptr.to(tl.pointer_type(tl.bfloat16))


@triton.jit
def _load_kv(ptr, mask, ELEM: tl.constexpr):
    # byte addresses -> bf16 values (every e4m3 value is exact in bf16)
    if ELEM == 1:
        return tl.load(ptr, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
    else:
        return tl.load(ptr.to(tl.pointer_type(tl.bfloat16)), mask=mask, other=0.0)


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # bf16 tensor-core dot; F32 (interpreter only): numpy has no bf16 and mis-multiplies it
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _drop_carrier(q, lane_row, dd, D: tl.constexpr, CARRIER: tl.constexpr):
    # The borrowed lane (head h*G, lane D-1) carries the decision, not a query value: read as 0.
    if CARRIER:
        q = tl.where(lane_row[:, None] & (dd == D - 1)[None, :], 0.0, q)
    return q


@triton.jit
def _write_kv(data, kv_off, page, off, k_ptrs, v_ptrs, mask, P: tl.constexpr, D: tl.constexpr,
              ELEM: tl.constexpr):
    # kv_off: [.., BLOCK_D] byte offsets of the dims inside a K row; page/off broadcastable
    kb = _kv_byte_off(page, off, P, D, ELEM) + kv_off
    kx = tl.load(k_ptrs, mask=mask, other=0.0)
    vx = tl.load(v_ptrs, mask=mask, other=0.0)
    tl.store(_store_ptr(data + kb, ELEM), _to_store(kx, ELEM), mask=mask)
    tl.store(_store_ptr(data + kb + P * D * ELEM, ELEM), _to_store(vx, ELEM), mask=mask)


@triton.jit
def _pop(free_top, n):
    # Take n entries off the free stack: returns (old top, ok). A failed pop does not undo:
    # the top stays negative for the rest of the launch, so no later pop can succeed and take
    # entries that an undo would hand out again; its n goes to the debt word free_top[1].
    old = tl.atomic_add(free_top, -n)
    ok = (old >= n) | (n == 0)
    if ok == 0:
        tl.atomic_add(free_top + 1, n)
    return old, ok


@triton.jit
def _take_pages(arena, o_stack, o_pages, rh, MAXP, old, npg, BLOCK_PG: tl.constexpr):
    # after a successful _pop(npg) that returned `old`: free_stack[old-npg, old) become the
    # first npg entries of row rh's page table (an empty row's)
    pp = tl.arange(0, BLOCK_PG)
    for p0 in range(0, npg, BLOCK_PG):
        pm = p0 + pp < npg
        ids = tl.load(arena + o_stack + old - npg + p0 + pp, mask=pm)
        tl.store(arena + o_pages + rh * MAXP + p0 + pp, ids, mask=pm)


@triton.jit
def _settle(free_top, nprog):
    # Every program of a popping launch ends here; the last one repays the failed pops' debt
    # (free_top[2] counts finished programs; acq_rel atomics order the debt before the count).
    done = tl.atomic_add(free_top + 2, 1)
    if done == nprog - 1:
        debt = tl.atomic_xchg(free_top + 1, 0)
        tl.atomic_add(free_top, debt)
        tl.atomic_xchg(free_top + 2, 0)


# ---------------------------------------------------------------------------- release
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


# ---------------------------------------------------------------------------- host helpers
def _live_arg(live: torch.Tensor | None, layout: ArenaLayout,
              placeholder: torch.Tensor) -> torch.Tensor:
    # Without a counter the kernels get a placeholder pointer that HAS_LIVE=False never touches.
    if live is None:
        return placeholder
    _check(live, "live", torch.int32, (layout.num_slots,), placeholder.device)
    return live


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple | None = None,
           device: torch.device | None = None, last_contig: bool = False,
           any_strides: bool = False) -> None:
    assert isinstance(t, torch.Tensor), f"{name} must be a tensor"
    assert t.dtype == dtype, f"{name}: dtype {t.dtype}, expected {dtype}"
    if shape is not None:
        assert t.dim() == len(shape) and all(w is None or w == s for w, s in zip(shape, t.shape)), (
            f"{name}: shape {tuple(t.shape)}, expected {shape}")
    if device is not None:
        assert t.device == device, f"{name} on {t.device}, expected {device}"
    if any_strides:
        pass
    elif last_contig:
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
    else:
        assert t.is_contiguous(), f"{name} must be contiguous"


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


def check_store_args(kv_layer: torch.Tensor, layout: ArenaLayout, k: torch.Tensor,
                     v: torch.Tensor, slots: torch.Tensor, layer_pages: torch.Tensor,
                     overflow: torch.Tensor, live: torch.Tensor | None, n_tok: int):
    """Checks shared by every store wrapper; returns (int32 words, batch size, live arg)."""
    words = arena_words(kv_layer, layout)
    dev, H, D = kv_layer.device, layout.num_kv_heads, layout.head_dim
    _check(k, "k", torch.bfloat16, (n_tok, H, D), dev, last_contig=True)
    _check(v, "v", torch.bfloat16, (n_tok, H, D), dev, last_contig=True)
    B = slots.shape[0]
    _check(slots, "slots", torch.int32, (B,), dev)
    _check(layer_pages, "layer_pages", torch.int32, (layout.num_slots,), dev)
    _check(overflow, "overflow", torch.int32, (1,), dev)
    return words, B, _live_arg(live, layout, layer_pages)


def dms_prefill_pack(*args, **kwargs) -> None:
    """``vllm_dms.worker.kernels.pack.dms_prefill_pack`` (it needs the prefill survivor index, so it
    lives there; imported lazily: that module imports this one)."""
    from vllm_dms.worker.kernels.pack import dms_prefill_pack as pack
    pack(*args, **kwargs)
