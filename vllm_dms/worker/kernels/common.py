"""What every arena kernel module shares (layout: vllm_dms/engine/arena.py).

It imports no other kernel module, and every other kernel module imports it (no import circle).

* ``arena_state`` / ``arena_words`` / ``state_word_offsets``: named and int32 views of one layer
  tensor.
* Triton jit helpers: K/V and meta addressing, FP8 e4m3 conversion, dots, the carrier lane, the
  free-stack pop / take / settle below.
* Host checks shared by the launch wrappers (``_check``, ``check_store_args``).

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


def fp8_grid(x: torch.Tensor) -> torch.Tensor:
    """bf16 -> the bf16 value an FP8 arena hands back for it (e4m3, scale 1, saturating, round
    to nearest even: the same bits as _e4m3_bits, whose values are all exact in bf16)."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.bfloat16)


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
