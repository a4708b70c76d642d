"""The compact DMS arena: byte layout, sizing and the one reservation function.

Where the bytes live
--------------------
vLLM sizes and allocates the KV memory as usual (gpu_memory_utilization, kv_cache_memory_bytes and
num_gpu_blocks_override all apply) from our KV-cache spec: one tensor per layer of
``num_blocks * page_bytes`` bytes. We never use vLLM's block ids to address it. Each layer tensor
is *our* arena for that layer:

    layer tensor (uint8, num_blocks * page_bytes)
    +-------------------------------+--------------------------------------------------------+
    | state region                  | data sub-pages j = first_data_subpage .. num_subpages-1 |
    | blocks [0, first_data_block)  | (block b holds sub-pages b*H .. b*H+H-1)               |
    +-------------------------------+--------------------------------------------------------+

    page_bytes     = H * P * slot_bytes        (one vLLM block = H sub-pages of P slots)
    slot_bytes     = 2 * D * elem + 4          (K, V in the store dtype, then a 4-byte meta word)
    sub-page j     : bytes [j*SPB, (j+1)*SPB), SPB = P * slot_bytes, laid out as
                     K[P, D] (elem bytes each) | V[P, D] | meta[P] int32
    meta word      : position of the token (bits 0..30) | evict flag << 31
    elem           : 1 for FP8 e4m3 (dms_fp8, per-tensor scale 1.0, values clamped to +-448),
                     2 for the bf16 test store

State region (int32 words, offsets in words from byte 0 of the layer tensor; S1 = max_num_seqs+1
request slots, slot 0 unused):

    free_top   [16]             word 0: number of entries on the free stack (rest: padding)
    free_stack [NSP]            ids of free data sub-pages (a stack; pops and pushes are atomic)
    row_len    [S1, H]          live tokens of row (slot, head) == the DMS live count
    row_npages [S1, H]          sub-pages the row holds
    ring       [S1, H, W+1]     row slot index of token p at ring[p % (W+1)], for the last W+1 p
    row_pages  [S1, H, MAXP]    sub-page ids of the row, in order; row slot r lives in
                                sub-page row_pages[r // P] at offset r % P

A row's live tokens always occupy row slots [0, row_len): prefill packs survivors densely, and a
decode step either reuses the slot of the token that just left the window (if it was flagged) or
appends at row_len. So there are no holes, no compaction, and at most one slot changes per step.

Ownership and accounting
------------------------
The scheduler-side ledger is vLLM's own BlockPool: a request holds ``reservation_blocks(...)``
blocks, each worth H data sub-pages in *every* layer. Blocks [1, first_data_block) are taken off
the pool once at startup (they hold the state region). The GPU allocator hands out physical
sub-pages from each layer's free stack; the ledger guarantees that, per layer, the sub-pages a
request holds never exceed H * (its blocks), so a pop never underflows. The kernels still check
and raise an overflow flag instead of writing out of bounds.

The worker sees exactly one block id per request: its slot s in [1, max_num_seqs] plus S1 times
the slot's owner tag (``channel.encode_block_id``), stable from first scheduling to
free/preemption. Freed slots are queued (``RELEASE``) and their sub-pages are
pushed back to the free stacks at the start of the next step, before any new request packs.

Reservation (``reservation_blocks``)
-----------------------------------
For a request that will have n tokens after this step:
* nothing measured yet (first chunk, or a preempted request): every row may keep every token,
  so ``cdiv(n, P)`` blocks (the dense FP8 page count; paid only while the prompt is prefilled);
* measured after the previous step (n_done tokens, worst layer holding ``pages_max`` sub-pages):
  each row grows by at most g = n - n_done tokens, i.e. at most cdiv(g, P) sub-pages, so
  ``cdiv(pages_max, H) + cdiv(g, P)`` blocks (min with the unmeasured bound).
After prefill the reservation therefore shrinks to the compact footprint. When a head outgrows
its reservation the scheduler asks the pool for more blocks before the step; if the pool is empty
vLLM preempts (recompute), exactly as for dense KV.
"""
from __future__ import annotations

import dataclasses
import math

from vllm_dms.engine.config import DMSConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


FREE_TOP_WORDS = 16  # free_top padded to 64 bytes


@dataclasses.dataclass(frozen=True)
class ArenaLayout:
    num_layers: int
    num_kv_heads: int     # H (per rank)
    head_dim: int         # D
    block_size: int       # P: slots per sub-page == tokens per vLLM block
    window: int           # W
    max_num_seqs: int     # S
    max_model_len: int
    num_blocks: int       # vLLM blocks per layer tensor
    elem_bytes: int = 1   # 1: FP8 e4m3, 2: bf16

    @classmethod
    def from_config(cls, dms: DMSConfig, *, block_size: int, max_num_seqs: int,
                    max_model_len: int, num_blocks: int, elem_bytes: int = 1) -> "ArenaLayout":
        return cls(num_layers=dms.num_layers, num_kv_heads=dms.num_kv_heads,
                   head_dim=dms.head_dim, block_size=block_size, window=dms.window,
                   max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                   num_blocks=num_blocks, elem_bytes=elem_bytes)

    # ------------------------------------------------------------------ byte sizes
    @property
    def slot_bytes(self) -> int:
        return 2 * self.head_dim * self.elem_bytes + 4

    @property
    def subpage_bytes(self) -> int:
        return self.block_size * self.slot_bytes

    @property
    def page_bytes(self) -> int:
        return self.num_kv_heads * self.subpage_bytes

    @property
    def max_pages_per_row(self) -> int:
        return cdiv(self.max_model_len, self.block_size) + 1

    @property
    def num_slots(self) -> int:  # S1, slot 0 unused
        return self.max_num_seqs + 1

    # ------------------------------------------------------------------ state region (words)
    @property
    def num_subpages_bound(self) -> int:
        return self.num_blocks * self.num_kv_heads

    def state_offsets(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """name -> (offset in int32 words, shape)."""
        S1, H = self.num_slots, self.num_kv_heads
        parts = [("free_top", (FREE_TOP_WORDS,)),
                 ("free_stack", (self.num_subpages_bound,)),
                 ("row_len", (S1, H)),
                 ("row_npages", (S1, H)),
                 ("ring", (S1, H, self.window + 1)),
                 ("row_pages", (S1, H, self.max_pages_per_row))]
        out, off = {}, 0
        for name, shape in parts:
            out[name] = (off, shape)
            off += math.prod(shape)
            off = cdiv(off, 16) * 16  # keep every array 64-byte aligned
        out["_end"] = (off, ())
        return out

    @property
    def state_bytes(self) -> int:
        return self.state_offsets()["_end"][0] * 4

    @property
    def first_data_block(self) -> int:
        """Blocks [0, first_data_block) hold the state region (block 0 is vLLM's null block)."""
        return max(1, cdiv(self.state_bytes, self.page_bytes))

    @property
    def first_data_subpage(self) -> int:
        return self.first_data_block * self.num_kv_heads

    @property
    def num_data_blocks(self) -> int:
        return self.num_blocks - self.first_data_block

    @property
    def num_data_subpages(self) -> int:
        return self.num_data_blocks * self.num_kv_heads

    def validate(self) -> None:
        if self.num_data_blocks < 1:
            raise ValueError(
                f"DMS arena too small: {self.num_blocks} blocks of {self.page_bytes} B per layer, "
                f"but the state region alone needs {self.first_data_block} blocks "
                f"({self.state_bytes} B for max_num_seqs={self.max_num_seqs}, "
                f"max_model_len={self.max_model_len}); raise --gpu-memory-utilization or "
                f"lower --max-num-seqs")

    # ------------------------------------------------------------------ reservation
    def reservation_blocks(self, n_tokens: int, measured: tuple[int, int] | None = None) -> int:
        """Blocks a request needs to hold so that n_tokens can be processed without overflow.

        measured = (n_done, pages_max): tokens already in the arena and the largest number of
        sub-pages the request holds in any one layer, as reported after the previous step.
        """
        worst = cdiv(n_tokens, self.block_size)
        if measured is None:
            return worst
        n_done, pages_max = measured
        grow = max(0, n_tokens - n_done)
        return min(worst, cdiv(pages_max, self.num_kv_heads) + cdiv(grow, self.block_size))

    def max_request_blocks(self) -> int:
        """Reservation of one max_model_len request before anything is measured."""
        return self.reservation_blocks(self.max_model_len)


def spec_page_bytes(num_kv_heads: int, head_dim: int, block_size: int, elem_bytes: int = 1) -> int:
    """Page bytes of the DMS KV-cache spec (one vLLM block, one layer)."""
    return num_kv_heads * block_size * (2 * head_dim * elem_bytes + 4)
