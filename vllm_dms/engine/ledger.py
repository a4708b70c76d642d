"""DMSKVCacheManager: the reservation ledger on vLLM's own BlockPool (block ids are slots).

The design is in ``vllm_dms.engine.arena`` (module docstring). Scheduler-side contract:

* Blocks ``[1, first_data_block)`` of the pool hold the arena's state region; they are taken off
  the pool once, at startup, and never returned.
* Each running request owns ONE visible block id: its slot ``s`` in ``[1, max_num_seqs]`` and the
  slot's generation ``g`` (bumped at every assignment, mod ``TAG_GENERATIONS``), encoded as
  ``s + S1 * g`` (a ``KVCacheBlock`` fabricated here, never from the pool). The worker sees it
  when the request is (re)scheduled as new or resumed and no new block ids afterwards; it
  publishes ``g`` with the slot's measurement, so a row of a previous owner is never trusted.
* Its reservation is a list of hidden pool blocks, resized on every ``allocate_slots`` to
  ``layout.reservation_blocks(n, measured)``: grown from the pool (``None`` when it does not
  fit, so vLLM preempts or blocks the queue exactly as for dense KV) or shrunk (surplus goes back).
* ``free`` (finish, abort, preemption) returns the hidden blocks and the slot, and queues the slot
  on ``link.release`` for the workers; with ``--enable-prefix-caching`` a normally finished
  request's slot and blocks become a prefix entry instead (``vllm_dms.engine.prefix_cache``), and
  entries (also prefix snapshots) are evicted least recently used when blocks or slots run out.

Sync or async scheduling (``DMSScheduler`` / ``DMSAsyncScheduler``, ``vllm_dms.engine.scheduler``):
the reservation reads the worker's latest landed measurement of this owner (``link``, filled from
each ModelRunnerOutput: ``vllm_dms.engine.channel``), which may lag by a step or two;
``reservation_blocks`` adds the growth since then (``_measured``).

Release ordering under async scheduling (vLLM's batch queue, ``EngineCore.step_with_batch_queue``:
schedule N+1, enqueue N+1, then update_from_output(N)): a slot freed during schedule (preemption),
an abort, or update_from_output(N) goes to the free heap and ``link.release`` at once, so only a
later ``allocate_slots`` can hand it out; the release travels on the SchedulerOutput of the next
schedule (the one that may hand the slot out again) and the worker applies it before that step's
forward, i.e. before its packs, and on the same CUDA stream after every already-enqueued step,
including N+1 which may still write the old owner's row (a request that finished in N is often
scheduled once more in N+1). Its ledger blocks go back to the
pool at the same time and are only popped on the GPU by steps enqueued after that release.

Startup refuses (``DMSConfigError``) an arena that cannot hold one unmeasured max_model_len
request, so a request that can never fit is impossible after startup: every request is capped at
max_model_len and the arena holds that alone. Per-request rules live in
``vllm_dms.engine.validation`` (the scheduler's ``add_request`` finishes a violating request with
FINISHED_ERROR; the engine keeps serving).

Metrics: ``gauges()`` is what the scheduler's ``make_stats`` (``vllm_dms.engine.scheduler``) adds to
the SchedulerStats it sends to the front-end, read there by ``vllm_dms.engine.metrics``.
"""
from __future__ import annotations

import heapq
from typing import Any

from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.request import Request, RequestStatus

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.engine.channel import TAG_GENERATIONS, SchedulerLink, encode_block_id
from vllm_dms.engine.config import DMSConfigError
from vllm_dms.engine.prefix_cache import SNAPSHOT_STRIDE, Entry, PrefixEntries, PrefixStore
from vllm_dms.engine.spec import DMSCompactSpec


def dms_spec_of(kv_cache_config: KVCacheConfig) -> DMSCompactSpec | None:
    """The DMS spec of a KV cache config, None for a config without DMS layers."""
    specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
    if not any(isinstance(s, DMSCompactSpec) for s in specs):
        return None
    if len(specs) != 1:
        raise ValueError(f"DMS needs every attention layer on DMSCompactSpec (one KV cache "
                         f"group); got {len(specs)} groups: {[type(s).__name__ for s in specs]}")
    return specs[0]


class DMSKVCacheManager(PrefixEntries, KVCacheManager):
    """KVCacheManager whose blocks are a reservation ledger and whose block ids are slots."""

    def __init__(self, kv_cache_config: KVCacheConfig, *, max_num_seqs: int,
                 enable_prefix_caching: bool = False, tp_size: int = 1, **kwargs: Any):
        kwargs["enable_caching"] = False  # no block sharing: entries are whole rows (prefix_cache)
        super().__init__(kv_cache_config, **kwargs)
        spec = dms_spec_of(kv_cache_config)
        assert spec is not None, "DMSKVCacheManager needs a DMSCompactSpec KV cache config"
        if kwargs.get("dcp_world_size", 1) > 1:
            raise ValueError("DMS does not support decode context parallelism")
        if max_num_seqs > spec.dms_max_num_seqs:
            raise ValueError(f"max_num_seqs={max_num_seqs} exceeds the {spec.dms_max_num_seqs} "
                             f"slots the DMS state region was sized for (DMSCompactSpec)")
        group = kv_cache_config.kv_cache_groups[0]
        self.layout = ArenaLayout(
            num_layers=len(group.layer_names), num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_size, block_size=spec.block_size, window=spec.dms_window,
            max_num_seqs=spec.dms_max_num_seqs, max_model_len=self.max_model_len,
            num_blocks=kv_cache_config.num_blocks, elem_bytes=spec.dms_elem_bytes)
        self.layout.validate()
        assert self.layout.page_bytes == spec.page_size_bytes, (self.layout, spec)
        self.tp_size = tp_size  # the spec (and a block) is one rank's: KV heads / tp

        # The state region, for good. A fresh pool hands out ids in order after the null block 0.
        first = self.layout.first_data_block
        self.state_blocks = self.block_pool.get_new_blocks(first - 1)
        ids = [b.block_id for b in self.state_blocks]
        if ids != list(range(1, first)):
            raise RuntimeError(f"DMS state region must be blocks [1, {first}), pool gave {ids[:8]}")
        self.num_usable = self.block_pool.get_num_free_blocks()
        assert self.num_usable == self.layout.num_data_blocks
        # Startup, not per request: after this no request can be too big for the arena.
        if self.num_usable < self.layout.max_request_blocks():
            P = self.layout.block_size
            raise DMSConfigError(
                f"DMS arena too small for --max-model-len {self.max_model_len}: one request of "
                f"that length needs {self.layout.max_request_blocks()} blocks of {P} tokens "
                f"before its compression is measured, but the arena has {self.num_usable} data "
                f"blocks ({first} of {self.layout.num_blocks} blocks hold the state region), "
                f"i.e. at most {self.num_usable * P} tokens per request. Lower --max-model-len "
                f"to at most {self.num_usable * P}, or raise --gpu-memory-utilization (or "
                f"--kv-cache-memory-bytes / --num-gpu-blocks-override; a lower --max-num-seqs "
                f"also shrinks the state region)")

        S1 = self.layout.num_slots
        # The runner computes block_id * block_size (+ offset) in int32: keep the largest id safe.
        if S1 * TAG_GENERATIONS * self.layout.block_size >= 2 ** 31:
            raise DMSConfigError(
                f"DMS: max_num_seqs={max_num_seqs} with block size {self.layout.block_size} "
                f"makes tagged block ids overflow int32; lower --max-num-seqs or --block-size")
        self.max_num_seqs = max_num_seqs
        self._free_slots = list(range(1, max_num_seqs + 1))  # a sorted list is a valid heap
        self._gen = [0] * S1  # per slot, bumped at every assignment: the owner tag
        # Fabricated per assignment; never enter the pool, only their block_id is read.
        self._blocks_of: dict[str, KVCacheBlocks] = {}
        self._slot_of: dict[str, int] = {}
        self._held: dict[str, list[KVCacheBlock]] = {}
        self.num_held = 0  # blocks of running requests (cache entries hold theirs apart)
        # --enable-prefix-caching: finished requests' rows, taken whole by a matching prompt.
        self.cache = PrefixStore() if enable_prefix_caching else None
        self._pending: dict[str, Entry] = {}        # get_computed_blocks' hit, until allocated
        self._hint: dict[str, tuple[int, int]] = {}  # a taken entry's measurement, until ours
        self.snapshot_stride = SNAPSHOT_STRIDE
        # This engine's half of the step messages (vllm_dms.engine.channel): orders for its workers,
        # the rows they reported. Nothing is shared with another engine in this process.
        self.link = SchedulerLink(self.layout.num_slots)

    # ------------------------------------------------------------------ admission
    def refusal(self, request: Request) -> str | None:
        """Why a request can never be served (its unmeasured worst case exceeds the arena).

        Unreachable after startup (``__init__`` refuses an arena that cannot hold max_model_len);
        kept so a broken invariant fails one request instead of the engine.
        """
        n = min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)
        need = self.layout.reservation_blocks(n)
        if need <= self.num_usable:
            return None
        P, lay = self.layout.block_size, self.layout
        return (f"DMS request {request.request_id} can never fit: prompt "
                f"{request.num_prompt_tokens} + max_tokens {request.max_tokens} = {n} tokens "
                f"(capped at max_model_len {self.max_model_len}) needs {need} blocks of {P} "
                f"tokens before any compression is measured, but the arena has "
                f"{self.num_usable} data blocks ({lay.num_blocks} blocks minus "
                f"{lay.first_data_block} for the state region), i.e. at most "
                f"{self.num_usable * P} tokens per request")

    def _row(self, slot: int) -> tuple[int, int, int, int] | None:
        """The slot's landed row if it was written for its current owner (tag == generation)."""
        row = self.link.read_row(slot)
        if row[0] < 0 or row[3] != self._gen[slot]:
            return None
        return row

    def _measured(self, request: Request, slot: int | None) -> tuple[int, int] | None:
        if slot is None:
            return None
        row = self._row(slot)
        # A lagging row (async: one or two steps old) is fine: reservation_blocks adds the growth
        # n - n_done; a row ahead of the scheduler's state is not ours to trust.
        if row is None or row[0] > request.num_computed_tokens:
            return self._hint.get(request.request_id)  # a taken entry's rows, until measured
        self._hint.pop(request.request_id, None)
        return row[0], row[1]

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       num_new_computed_tokens: int = 0,
                       new_computed_blocks: KVCacheBlocks | None = None,
                       num_lookahead_tokens: int = 0, num_external_computed_tokens: int = 0,
                       delay_cache_blocks: bool = False, num_encoder_tokens: int = 0,
                       full_sequence_must_fit: bool = False, reserved_blocks: int = 0,
                       has_scheduled_reqs: bool = True) -> KVCacheBlocks | None:
        if (num_external_computed_tokens or num_encoder_tokens
                or (new_computed_blocks is not None and any(new_computed_blocks.blocks))):
            raise NotImplementedError("DMS arena: KV-connector loads, shared blocks and encoder "
                                      "tokens are not supported")
        if num_new_tokens <= 0:
            raise ValueError("num_new_tokens must be greater than 0")
        rid = request.request_id
        slot = self._slot_of.get(rid)
        entry = self._hit_for(request, num_new_computed_tokens, slot)
        fork = self._fork_from(entry)  # a snapshot: copy its rows, leave it for the next hit
        held = [] if fork else list(entry.held) if entry is not None else self._held.get(rid, [])
        measured = entry.measured if entry is not None else self._measured(request, slot)
        before = 0 if entry is not None else len(held)
        # Same watermark rule as the stock manager: only for admissions next to running work.
        watermark = self.watermark_blocks if has_scheduled_reqs and request.status in (
            RequestStatus.WAITING, RequestStatus.PREEMPTED) else 0

        if full_sequence_must_fit:
            # Whole known sequence, unmeasured; capped so a resumed request can always re-enter.
            full = self.layout.reservation_blocks(min(request.num_tokens, self.max_model_len))
            want = max(0, min(full, self.num_usable) - len(held)) + watermark
            if want > self._room(want, keep=entry):
                return None

        n = min(request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
                + num_lookahead_tokens, self.max_model_len)
        need = self.layout.reservation_blocks(n, measured)
        grow = need - len(held)
        want = max(0, grow) + watermark
        if want > self._room(want + reserved_blocks, keep=entry) - reserved_blocks:
            return None
        new = slot is None
        if new and entry is not None and not fork:  # take the entry: its slot, rows, blocks
            slot = self.cache.remove(entry).slot
        elif new:
            victim = self.cache.oldest(entry) if self.cache and not self._free_slots else None
            if victim is not None:
                self._evict(victim)  # running <= max_num_seqs: an entry holds a slot
            if not self._free_slots:
                return None  # unreachable while len(running) <= max_num_seqs
            slot = heapq.heappop(self._free_slots)
        if new and entry is not None:
            del self._pending[rid]
            if entry.measured is not None:
                self._hint[rid] = entry.measured  # the rows' size until the slot reports
            if fork:  # the worker copies the rows before this step's kernels
                entry.pinned = True
                self.link.forks.append((entry.slot, slot))
        if new:
            self._slot_of[rid] = slot
            gen = self._gen[slot] = (self._gen[slot] + 1) % TAG_GENERATIONS
            self._blocks_of[rid] = KVCacheBlocks(((KVCacheBlock(
                encode_block_id(slot, gen, self.layout.num_slots)),),))
            self.link.invalidate(slot)
        if grow > 0:
            held.extend(self.block_pool.get_new_blocks(grow))
        elif grow < 0:
            surplus = held[need:]
            del held[need:]
            self.block_pool.free_blocks(reversed(surplus))
        self._held[rid] = held
        self.num_held += len(held) - before
        if new and entry is None:
            self._order_snapshots(request, num_new_tokens)
        return self._blocks_of[rid] if new else self.empty_kv_cache_blocks

    def free(self, request: Request) -> None:
        rid = request.request_id
        slot = self._slot_of.get(rid)
        keep = slot is not None and self._cacheable(request)
        measured = self._measured(request, slot) if keep else None  # (it reads _hint)
        held = self._held.pop(rid, None) or []
        self.num_held -= len(held)
        self._slot_of.pop(rid, None)
        self._blocks_of.pop(rid, None)
        self._pending.pop(rid, None)
        self._hint.pop(rid, None)
        if keep:
            # Its rows hold the DMS state of its first L tokens: keep them for a prompt that
            # starts with exactly those tokens (async: an already enqueued step may still add
            # token L-1; num_computed_tokens counts it, so the rows and L agree).
            L = request.num_computed_tokens
            self.cache.put(Entry(slot, tuple(request.all_token_ids[:L]), held, measured))
            return
        if held:
            self.block_pool.free_blocks(reversed(held))
        if slot is not None:
            self._release_slot(slot)

    def _release_slot(self, slot: int) -> None:
        heapq.heappush(self._free_slots, slot)
        self.link.invalidate(slot)
        self.link.release.append(slot)

    def pop_blocks_for_free(self, request: Request) -> list[KVCacheBlock]:
        raise NotImplementedError("DMS arena: deferred frees (KV connectors) are not supported")

    # ------------------------------------------------------------------ queries
    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        return self._blocks_of.get(request_id, self.empty_kv_cache_blocks)

    def slot_of(self, request_id: str) -> int | None:
        return self._slot_of.get(request_id)

    def held_blocks(self, request_id: str) -> int:
        return len(self._held.get(request_id, ()))

    def get_num_common_prefix_blocks(self, running_request_id: str) -> list[int]:
        return [0] * self.num_kv_cache_groups

    def estimate_cached_tokens(self, request: Request) -> int:
        return 0

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        pass

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        pass

    def reset_prefix_cache(self) -> bool:
        # Drop every entry (a snapshot still being written goes at the next reset); like the
        # stock pool, report success only once no request holds KV.
        for e in self.cache.entries() if self.cache else ():
            e.pinned = False  # forks ordered by past schedules have run (each step builds first)
        while self.cache and self.cache.oldest() is not None:
            self._evict(self.cache.oldest())
        ok = self.num_held == 0
        if ok and self.log_stats and self.prefix_cache_stats is not None:
            self.prefix_cache_stats.reset = True
        return ok

    @property
    def usage(self) -> float:
        return self.num_held / self.num_usable

    def dms_stats(self) -> dict[str, Any]:
        """Ledger snapshot for tools and tests (live_tokens stays None; see ``gauges``)."""
        L, page = self.layout.num_layers, self.layout.page_bytes
        subpages = 0
        for rid, slot in self._slot_of.items():
            row = self._row(slot)
            if row is not None:
                subpages += row[1]
        return dict(
            live_tokens=None,
            measured_subpages_max=subpages,  # sum over slots of the fullest layer's sub-pages
            arena_bytes_in_use=(self.layout.first_data_block + self.num_held) * page * L,
            arena_bytes_total=self.layout.num_blocks * page * L,
            reserved_blocks=self.num_held,
            cached_blocks=self.cache.num_blocks if self.cache is not None else 0,
            cache_entries=len(self.cache) if self.cache is not None else 0,
            usable_blocks=self.num_usable,
            state_blocks=self.layout.first_data_block,
            num_slots_in_use=len(self._slot_of),
        )

    def gauges(self) -> dict[str, float]:
        """The DMS Prometheus gauges (``vllm_dms.engine.metrics``), from the worker's last report.

        KV tokens count (token, layer, KV head) entries of the running requests; dense is what
        a full cache would hold (tokens * layers * heads, all TP ranks). Arena bytes follow the
        ledger, like ``usage``: in use = state region + reserved blocks, free = the pool's free
        blocks (a block is one per rank).
        """
        lay = self.layout
        rows = lay.num_layers * lay.num_kv_heads * self.tp_size  # live counts sum all ranks
        block_bytes = lay.page_bytes * lay.num_layers * self.tp_size  # a block on every rank
        dense = live = 0
        for slot in self._slot_of.values():
            row = self._row(slot)
            if row is not None and row[0] > 0:  # n_done and live come from one worker copy
                dense += row[0] * rows
                live += row[2]
        cached = self.cache.num_blocks if self.cache is not None else 0
        in_use = (lay.first_data_block + self.num_held + cached) * block_bytes
        return dict(
            live_kv_tokens=live,
            evicted_kv_tokens=dense - live,
            compression_ratio=dense / live if live else 1.0,  # nothing held: no compression
            arena_bytes_in_use=in_use,
            arena_bytes_free=lay.num_blocks * block_bytes - in_use,
        )
