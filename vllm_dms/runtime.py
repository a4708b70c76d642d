"""Worker-side DMS runtime: one per worker process, shared by every DMS attention layer.

It owns what is not per layer: the arena layout, the per-(layer, slot) sub-page counters, the
per-slot token and live-KV counters, the overflow flag, the split-K workspace, and the feedback
copy that tells the scheduler (same process at TP=1, see ``vllm_dms.channel``) how much each
request holds.
Per-layer state lives inside each layer's KV tensor (``vllm_dms.arena``).
"""
from __future__ import annotations

import weakref

import torch

from vllm_dms.arena import ArenaLayout
from vllm_dms.config import DMSConfig

DECODE_SPLITS = 16  # most split-K programs per (request, kv head): the workspace's size


class DMSRuntime:
    def __init__(self, dms: DMSConfig, layout: ArenaLayout, layer_names: list[str],
                 num_q_heads: int, device: torch.device, max_rows: int | None = None):
        self.dms, self.layout, self.device = dms, layout, device
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        S1, L = layout.num_slots, layout.num_layers
        i32 = dict(dtype=torch.int32, device=device)
        self.layer_pages = torch.zeros(L, S1, **i32)    # sub-pages held per (layer, slot)
        self.slot_ntok = torch.zeros(S1, **i32)         # tokens in the arena per slot
        self.slot_live = torch.zeros(S1, **i32)         # live rows' tokens per slot (all layers)
        self.slot_tag = torch.zeros(S1, **i32)          # owner tag each slot was last scheduled with
        self.overflow = torch.zeros(1, **i32)           # set by kernels instead of writing OOB
        self.feedback = torch.zeros(S1, 4, **i32)       # (n_done, pages_max, live, tag) for the host
        self.overflow_host = torch.zeros(1, dtype=torch.int32,
                                         pin_memory=torch.cuda.is_available())
        from vllm_dms.kernels.decode import decode_workspace
        rows = max_rows or layout.max_num_seqs  # decode rows per step, CUDA-graph padding included
        self.ws = decode_workspace(rows, num_q_heads, layout.head_dim, DECODE_SPLITS, device)
        self._kv_refs: list[weakref.ref] = []  # the KV tensors (one engine's) this runtime owns

    def init_arenas(self, kv_layers: list[torch.Tensor]) -> None:
        from vllm_dms.kernels.arena_ops import arena_init
        for kv in kv_layers:
            arena_init(kv, self.layout)
        self._kv_refs = [weakref.ref(kv) for kv in kv_layers]  # weak: never pin a dead engine

    def serves(self, kv_layers: list[torch.Tensor]) -> bool:
        """True iff this runtime initialised exactly these KV tensors (i.e. the same engine)."""
        return (bool(self._kv_refs) and len(self._kv_refs) == len(kv_layers)  # set by init_arenas
                and all(r() is kv for r, kv in zip(self._kv_refs, kv_layers)))

    def release(self, kv_layers: list[torch.Tensor], slots: list[int]) -> None:
        """Return every sub-page of the freed slots to the free stacks (runs before any pack)."""
        from vllm_dms.kernels.arena_ops import dms_release
        t = torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True)
        for i, kv in enumerate(kv_layers):
            dms_release(kv, self.layout, t, self.layer_pages[i], live=self.slot_live)
        self.slot_ntok.index_fill_(0, t.long(), 0)

    def fork(self, kv_layers: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        """Copy the rows of each (source, destination) slot pair in every layer (prefix forks;
        the destinations are empty: released earlier in this step or never used)."""
        from vllm_dms.kernels.fork import dms_fork_rows
        t = torch.tensor(pairs, dtype=torch.int32).to(self.device, non_blocking=True)
        src, dst = t[:, 0].contiguous(), t[:, 1].contiguous()
        for i, kv in enumerate(kv_layers):
            dms_fork_rows(kv, self.layout, src, dst, self.layer_pages[i], self.overflow,
                          live=self.slot_live)

    def order_snapshots(self, orders: list[tuple[int, int, int, int]], slots: torch.Tensor,
                        cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's snapshot orders (request slot, L, cache slot, cache tag) as a pack over
        the prefill rows (request slots ``slots``, cu_seqlens ``cu``, on the GPU): (starts
        [k+1], lengths [k], cache slots [k], 0 = skip). A request may have several orders. The
        cache slots of orders whose request is in this batch get their token count and owner
        tag, so their rows are measured like requests'; the others are skipped and report
        nothing. No host sync: the orders go up in one small copy."""
        o = torch.tensor(orders, dtype=torch.int32).to(self.device, non_blocking=True)
        req, length, dst, tag = (o[:, i].contiguous() for i in range(4))
        hit = slots[None, :] == req[:, None]                    # [k, rows]
        starts = cu[:-1][hit.int().argmax(dim=1)]
        found = hit.any(dim=1)
        cache = dst.long()
        # Only a snapshot this step packs may report L tokens under its tag: the scheduler
        # takes that report as "rows written", so a skipped one keeps its previous row.
        self.slot_ntok.index_copy_(0, cache, torch.where(found, length, self.slot_ntok[cache]))
        self.slot_tag.index_copy_(0, cache, torch.where(found, tag, self.slot_tag[cache]))
        dst = torch.where(found, dst, torch.zeros_like(dst))  # not in this batch: skip
        return torch.cat([starts, starts[-1:]]), length, dst

    def slot_bytes(self, slot: int) -> int:
        """Arena bytes a slot holds: its sub-pages summed over layers (reads the GPU; tools only)."""
        return int(self.layer_pages[:, slot].sum()) * self.layout.subpage_bytes

    def publish(self) -> None:
        """Stage (n_done, pages_max, live, tag) per slot on the device (last layer of a step).

        Inside a captured decode graph only the device half runs; the copy to the host is
        posted by the next step's metadata build (``post``), outside the graph.
        """
        self.feedback[:, 0].copy_(self.slot_ntok)
        self.feedback[:, 1].copy_(self.layer_pages.amax(dim=0))
        self.feedback[:, 2].copy_(self.slot_live)
        self.feedback[:, 3].copy_(self.slot_tag)  # lets the scheduler drop a previous owner's row
        if not capturing():
            self.post()  # eager step (prefill, mixed): measured by the very next schedule

    def post(self) -> None:
        """Enqueue the host copies of the feedback and the overflow flag (never in a graph)."""
        from vllm_dms.channel import CHANNEL
        CHANNEL.ensure(self.layout.num_slots)
        CHANNEL.post(self.feedback)
        self.overflow_host.copy_(self.overflow, non_blocking=True)

    def check_overflow(self) -> None:
        """Called before each step: sees the last copy that has landed (one step later if async)."""
        if int(self.overflow_host[0]):
            from vllm_dms.channel import CHANNEL
            CHANNEL.overflow = True
            raise RuntimeError("dms_fp8: a kernel found the arena free stack short of what the "
                               "scheduler's reservation promised (ledger violated); refusing to "
                               "continue rather than corrupt other requests' KV")


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_RUNTIME: DMSRuntime | None = None


def get_runtime() -> DMSRuntime | None:
    return _RUNTIME


def set_runtime(rt: DMSRuntime) -> DMSRuntime:
    global _RUNTIME
    _RUNTIME = rt
    return rt
