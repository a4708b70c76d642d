"""Worker-side DMS runtime: one per worker (engine and TP rank), shared by its DMS layers.

It owns what is not per layer: the arena layout, the per-(layer, slot) sub-page counters, the
per-slot token and live-KV counters, the overflow flag, the split-K workspace, and the feedback
rows that tell the scheduler how much each request holds (``vllm_dms.engine.channel``).
Per-layer state lives inside each layer's KV tensor (``vllm_dms.engine.arena``).

``WorkerLink`` is the worker's half of the step messages, anchored on the engine's DMS attention
layers (so two engines in one process never share one): the orders that arrive on each
SchedulerOutput and the runtime that carries them out (``vllm_dms.patches.worker``).
"""
from __future__ import annotations

import weakref

import torch

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.engine.channel import COLS, FeedbackRing, StepOrders
from vllm_dms.engine.config import DMSConfig

DECODE_SPLITS = 16  # most split-K programs per (request, kv head): the workspace's size


class DMSRuntime:
    def __init__(self, dms: DMSConfig, layout: ArenaLayout, layer_names: list[str],
                 num_q_heads: int, device: torch.device, max_rows: int | None = None,
                 tp_group=None):
        self.dms, self.layout, self.device = dms, layout, device
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.tp_group = tp_group  # vLLM's TP GroupCoordinator when tp > 1: rows are combined
        S1, L = layout.num_slots, layout.num_layers
        i32 = dict(dtype=torch.int32, device=device)
        self.layer_pages = torch.zeros(L, S1, **i32)    # sub-pages held per (layer, slot)
        self.slot_ntok = torch.zeros(S1, **i32)         # tokens in the arena per slot
        self.slot_live = torch.zeros(S1, **i32)         # live rows' tokens per slot (all layers)
        self.slot_tag = torch.zeros(S1, **i32)          # owner tag each slot was last scheduled with
        self.overflow = torch.zeros(1, **i32)           # set by kernels instead of writing OOB
        self.feedback = torch.zeros(S1, COLS, **i32)    # (n_done, pages_max, live, tag), staged
        self.ring = FeedbackRing(S1)                    # its host copies, for the scheduler
        self.overflow_host = torch.zeros(1, dtype=torch.int32,
                                         pin_memory=torch.cuda.is_available())
        from vllm_dms.worker.kernels.decode import decode_workspace
        rows = max_rows or layout.max_num_seqs  # decode rows per step, CUDA-graph padding included
        self.ws = decode_workspace(rows, num_q_heads, layout.head_dim, DECODE_SPLITS, device)
        self._kv_refs: list[weakref.ref] = []  # the KV tensors (one engine's) this runtime owns

    def init_arenas(self, kv_layers: list[torch.Tensor]) -> None:
        from vllm_dms.worker.kernels.arena_ops import arena_init
        for kv in kv_layers:
            arena_init(kv, self.layout)
        self._kv_refs = [weakref.ref(kv) for kv in kv_layers]  # weak: never pin a dead engine

    def reset(self) -> None:
        """Empty every arena and zero every counter (before the first scheduled step).

        Whatever ran before it was no request of the scheduler's: the V2 runner's warmup feeds
        fake requests on block ids 1.. (slots 1..) straight to the worker, and their rows would
        otherwise keep sub-pages that the ledger counts as free.
        """
        self.init_arenas(self.kv_layers())
        for t in (self.layer_pages, self.slot_ntok, self.slot_live, self.slot_tag,
                  self.overflow, self.feedback):
            t.zero_()
        self.overflow_host.zero_()

    def kv_layers(self) -> list[torch.Tensor]:
        return [r() for r in self._kv_refs]

    def serves(self, kv_layers: list[torch.Tensor]) -> bool:
        """True iff this runtime initialised exactly these KV tensors (i.e. the same engine)."""
        return (bool(self._kv_refs) and len(self._kv_refs) == len(kv_layers)  # set by init_arenas
                and all(r() is kv for r, kv in zip(self._kv_refs, kv_layers)))

    def release(self, kv_layers: list[torch.Tensor], slots: list[int]) -> None:
        """Return every sub-page of the freed slots to the free stacks (runs before any pack)."""
        from vllm_dms.worker.kernels.arena_ops import dms_release
        t = torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True)
        for i, kv in enumerate(kv_layers):
            dms_release(kv, self.layout, t, self.layer_pages[i], live=self.slot_live)
        self.slot_ntok.index_fill_(0, t.long(), 0)

    def fork(self, kv_layers: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
        """Copy the rows of each (source, destination) slot pair in every layer (prefix forks;
        the destinations are empty: released earlier in this step or never used)."""
        from vllm_dms.worker.kernels.fork import dms_fork_rows
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

        Device work only, so a captured decode graph replays it; the host copy is posted after
        the forward (``post``), outside any graph.
        """
        self.feedback[:, 0].copy_(self.slot_ntok)
        self.feedback[:, 1].copy_(self.layer_pages.amax(dim=0))
        self.feedback[:, 2].copy_(self.slot_live)
        self.feedback[:, 3].copy_(self.slot_tag)  # lets the scheduler drop a previous owner's row

    def post(self) -> None:
        """Enqueue the host copies of the staged rows and the overflow flag (never in a graph).

        With TP every rank calls it after the same step: the rows are gathered, the fullest
        rank's pages and the sum of the live counts (each rank holds its own KV heads) kept.
        """
        rows, overflow = self.feedback, self.overflow
        if self.tp_group is not None:
            rows, overflow = combine_ranks(self.tp_group.all_gather(
                torch.cat([rows, overflow.expand(1, COLS)]), dim=0), self.tp_group.world_size)
        self.ring.post(rows)
        self.overflow_host.copy_(overflow, non_blocking=True)

    def check_overflow(self) -> None:
        """Called before each step: sees the last copy that has landed (one step later if async)."""
        if int(self.overflow_host[0]):
            raise RuntimeError("dms_fp8: a kernel found the arena free stack short of what the "
                               "scheduler's reservation promised (ledger violated); refusing to "
                               "continue rather than corrupt other requests' KV")


def combine_ranks(gathered: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[tp * (S1 + 1), COLS] (each rank's rows, then its overflow flag) -> (rows, overflow)."""
    g = gathered.view(tp, -1, COLS)
    rows = g[0, :-1].clone()  # n_done and tag are the same on every rank
    rows[:, 1] = g[:, :-1, 1].amax(dim=0)  # the reservation must cover the fullest rank
    rows[:, 2] = g[:, :-1, 2].sum(dim=0)   # live entries of all KV heads
    return rows, g[:, -1, :1].amax(dim=0)


LINK_ATTR = "dms_link"  # attribute of each DMS attention layer of an engine: its WorkerLink


class WorkerLink:
    """One worker's half of the step messages (``vllm_dms.engine.channel``)."""

    def __init__(self) -> None:
        self.runtime: DMSRuntime | None = None  # made by the first metadata build
        self.snapshots: list[tuple[int, int, int, int]] = []  # for the next build
        self.scheduled = False  # a step of the DMS scheduler has arrived

    def receive(self, orders: StepOrders | None) -> None:
        """Before the step's forward: release and fork now, queue snapshots for the build.

        ``None``: a step the DMS scheduler did not make (no orders attribute). The first one it
        did make starts from empty arenas (``DMSRuntime.reset``: warmup rows are not requests).
        """
        if orders is None:
            return
        if not self.scheduled:
            self.scheduled = True
            if self.runtime is not None:
                self.runtime.reset()
        if not orders:
            return
        rt = self.runtime
        if rt is None:  # nothing was ever packed: no row to release, no snapshot to fork
            assert not orders.forks, "DMS fork ordered before the worker built any step"
        else:
            if orders.release:
                rt.release(rt.kv_layers(), orders.release)
            if orders.forks:
                rt.fork(rt.kv_layers(), orders.forks)
        self.snapshots += orders.snapshots

    def take_snapshots(self) -> list[tuple[int, int, int, int]]:
        out, self.snapshots = self.snapshots, []
        return out

    def after_forward(self) -> None:
        if self.runtime is not None:
            self.runtime.post()

    def report(self):
        """The newest landed rows not reported yet ([S1, COLS] numpy), or None."""
        return None if self.runtime is None else self.runtime.ring.latest()


def dms_layer_names(ctx: dict) -> list[str]:
    """The dms_fp8 attention layers of an engine's static forward context."""
    return [n for n, layer in ctx.items() if getattr(layer, "kv_cache_dtype", None) == "dms_fp8"]


def worker_link(ctx: dict, layer_names: list[str]) -> WorkerLink:
    """The engine's WorkerLink, found on (or else put on) every one of its DMS layers."""
    layers = [ctx[n] for n in layer_names]
    link = next((getattr(x, LINK_ATTR) for x in layers if hasattr(x, LINK_ATTR)), None)
    link = link or WorkerLink()
    for x in layers:
        setattr(x, LINK_ATTR, link)
    return link


def engine_runtime(vllm_config) -> DMSRuntime | None:
    """The runtime of the worker that built ``vllm_config``'s model (tools, tests)."""
    ctx = vllm_config.compilation_config.static_forward_context
    names = dms_layer_names(ctx)
    return worker_link(ctx, names).runtime if names else None


def inprocess_engine(llm) -> tuple:
    """(DMSKVCacheManager, DMSRuntime) of a ``vllm.LLM`` whose engine core and worker run in
    this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, TP=1 uni executor); tools and tests.
    ``manager.link.release`` lists the slots freed since the last step: their rows stay in
    the arena until the next step delivers the release."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    rt = engine_runtime(llm.llm_engine.vllm_config)
    if core is None or rt is None:
        raise RuntimeError("no in-process DMS engine (engine core in a subprocess? set "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0; worker in another process? use "
                           "the uni executor)")
    return core.scheduler.dms, rt

