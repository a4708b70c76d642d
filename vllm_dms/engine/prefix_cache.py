"""Prefix reuse for dms_fp8 (opt-in ``--enable-prefix-caching``): finished requests' rows.

A DMS row cannot be shared between requests (decode rewrites expired slots in place), so the
cache keeps whole rows: when a request finishes normally, its arena slot and its ledger blocks
become an entry holding the DMS state of its first L tokens (L = the tokens it processed). A
new request whose prompt starts with exactly those L tokens (and is longer) *takes* the entry:
it gets that slot and those blocks, vLLM counts L computed tokens, and the rest of its prompt
runs as a continuation chunk (the same kernels as chunked prefill, which read the arena row
and apply the pending flag of token L-1). Multi-turn chat resends prompt + answer + a new turn:
that is the hit this serves, at no copy. A taken entry is gone (one taker); entries are evicted
least recently used whenever a request needs their blocks or a slot.

Shared prefixes of different prompts (a common system prompt) are served by *snapshots*: when a
request's first prefill chunk is scheduled, the scheduler also orders up to MAX_SNAPSHOTS packs
of its first L tokens (L a multiple of SNAPSHOT_STRIDE) into spare slots, from the same chunk
(``dms_prefill_pack(lens=...)``). A snapshot is an entry that becomes matchable once the worker
has reported its rows (written by the step that orders it); it is reserved at the dense bound
for L tokens, only if that much is free, and shrunk to its measured size once reported. A hit
on a snapshot is not taken but *forked*: the request gets a slot and blocks of its own and the
worker copies the snapshot's rows into them before the step (``StepOrders.forks``,
``kernels/fork.py``), so every prompt that shares the prefix reuses it; the snapshot is pinned
(not evictable) until that copy has run. Only when no other slot can be had is it taken.
Design notes: benchmarks/PREFIX_CACHING_DESIGN.md.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from typing import Any

from vllm.v1.request import Request, RequestStatus

from vllm_dms.engine.channel import TAG_GENERATIONS

KEY_TOKENS = 16  # entries are bucketed by their first tokens; a hit compares all L tokens
SNAPSHOT_STRIDE = 512  # snapshot lengths are multiples of this many tokens
MAX_SNAPSHOTS = 4      # per request: the longest few multiples below its first chunk


@dataclasses.dataclass
class Entry:
    slot: int
    tokens: tuple[int, ...]            # the L tokens whose DMS state the slot's rows hold
    held: list[Any]                    # the ledger blocks (vLLM KVCacheBlock) of those rows
    measured: tuple[int, int] | None   # (n_done, pages_max) last reported for the rows
    ready: bool = True                 # False: a snapshot whose rows this step still writes
    shared: bool = False               # a snapshot: a hit copies its rows (fork), it stays
    pinned: bool = False               # a fork reads its rows this step: not evictable

    @property
    def evictable(self) -> bool:
        return self.ready and not self.pinned

    @property
    def hittable(self) -> bool:
        """A snapshot only once the worker reported its rows: an order the worker skipped
        (its request not in the batch) leaves empty rows that must never be forked."""
        return self.ready and (self.measured is not None or not self.shared)


class PrefixStore:
    """Entries by slot (LRU order) and by their first KEY_TOKENS tokens."""

    def __init__(self) -> None:
        self._lru: OrderedDict[int, Entry] = OrderedDict()
        self._buckets: dict[tuple[int, ...], list[Entry]] = {}
        self.num_blocks = 0

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, e: Entry) -> None:
        assert e.slot not in self._lru, f"slot {e.slot} is already an entry"
        self._lru[e.slot] = e
        self._buckets.setdefault(e.tokens[:KEY_TOKENS], []).append(e)
        self.num_blocks += len(e.held)

    def match(self, tokens: list[int], max_len: int) -> Entry | None:
        """The longest entry whose L <= max_len tokens are a prefix of ``tokens``."""
        best = None
        for e in self._buckets.get(tuple(tokens[:KEY_TOKENS]), ()):
            L = len(e.tokens)
            if e.hittable and L <= max_len and (best is None or L > len(best.tokens)) and \
                    tuple(tokens[:L]) == e.tokens:
                best = e
        return best

    def has(self, tokens: tuple[int, ...]) -> bool:
        return any(e.tokens == tokens for e in self._buckets.get(tokens[:KEY_TOKENS], ()))

    def remove(self, e: Entry) -> Entry:
        del self._lru[e.slot]
        bucket = self._buckets[e.tokens[:KEY_TOKENS]]
        bucket.remove(e)
        if not bucket:
            del self._buckets[e.tokens[:KEY_TOKENS]]
        self.num_blocks -= len(e.held)
        return e

    def shrink(self, e: Entry, keep: int, pool: Any) -> None:
        """Give an entry's blocks beyond ``keep`` back to the pool (its measured size)."""
        if keep < len(e.held):
            surplus = e.held[keep:]
            del e.held[keep:]
            pool.free_blocks(reversed(surplus))
            self.num_blocks -= len(surplus)

    def touch(self, e: Entry) -> None:
        self._lru.move_to_end(e.slot)

    def oldest(self, keep: Entry | None = None) -> Entry | None:
        """The least recently used entry that may be evicted (never one still being written or
        read this step, never ``keep``)."""
        return next((e for e in self._lru.values() if e.evictable and e is not keep), None)

    def entries(self) -> list[Entry]:
        return list(self._lru.values())


class PrefixEntries:
    """The entry half of ``DMSKVCacheManager`` (mixed in; it owns the ledger, slots and
    ``self.cache``): matching, taking, snapshot orders, eviction."""

    def get_computed_blocks(self, request: Request) -> tuple[Any, int, int]:
        rid = request.request_id
        self._pending.pop(rid, None)
        # prompt_logprobs requests skip reading (vLLM's rule): their cached rows give no logprobs
        if self.cache is None or rid in self._slot_of or request.skip_reading_prefix_cache:
            return self.empty_kv_cache_blocks, 0, 0
        # at least one prompt token must run: it makes the first output
        e = self.cache.match(list(request.all_token_ids), request.num_tokens - 1)
        if e is not None:
            self._pending[rid] = e
            self.cache.touch(e)
        hit = len(e.tokens) if e is not None else 0
        if self.log_stats and self.prefix_cache_stats is not None:
            self.prefix_cache_stats.record(num_tokens=request.num_tokens, num_hits=hit,
                                           preempted=request.num_preemptions > 0)
        return self.empty_kv_cache_blocks, hit, 0

    def _cacheable(self, request: Request) -> bool:
        return (self.cache is not None and request.num_computed_tokens > 0
                and request.status in (RequestStatus.FINISHED_STOPPED,
                                       RequestStatus.FINISHED_LENGTH_CAPPED))

    def _hit_for(self, request: Request, num_computed: int, slot: int | None) -> Entry | None:
        if not num_computed:
            return None
        entry = self._pending.get(request.request_id)
        if entry is None or slot is not None or len(entry.tokens) != num_computed:
            raise NotImplementedError(f"DMS arena: {num_computed} computed tokens for "
                                      f"{request.request_id} without a DMS prefix entry")
        return entry

    def _order_snapshots(self, request: Request, num_new_tokens: int) -> None:
        """Order prefix snapshots of a first chunk (prefix_cache docstring): spare slots and
        dense-bound blocks only, never at the expense of anything else."""
        if self.cache is None or request.num_computed_tokens:
            return
        stride = self.snapshot_stride
        top = min(num_new_tokens, request.num_tokens - 1) // stride * stride
        tokens = list(request.all_token_ids)
        for L in list(range(top, 0, -stride))[:MAX_SNAPSHOTS]:
            key = tuple(tokens[:L])
            if self.cache.has(key):
                continue
            need = self.layout.reservation_blocks(L)
            if not self._free_slots or \
                    self.block_pool.get_num_free_blocks() < need + self.watermark_blocks:
                return
            slot = heapq.heappop(self._free_slots)
            gen = self._gen[slot] = (self._gen[slot] + 1) % TAG_GENERATIONS
            self.link.invalidate(slot)
            self.cache.put(Entry(slot, key, self.block_pool.get_new_blocks(need), None,
                                 ready=False, shared=True))
            self.link.snapshots.append((self._slot_of[request.request_id], L, slot, gen))

    def refresh_entries(self) -> None:
        """Start of a schedule: last step's snapshots exist now; measured ones shrink."""
        if self.cache is None:
            return
        for e in self.cache.entries():
            e.ready, e.pinned = True, False  # last step wrote the snapshots and ran the forks
            if e.measured is None:
                row = self._row(e.slot)
                if row is not None and row[0] == len(e.tokens):
                    e.measured = (row[0], row[1])
                    keep = self.layout.reservation_blocks(row[0], e.measured)
                    self.cache.shrink(e, keep, self.block_pool)

    def _fork_from(self, entry: Entry | None) -> bool:
        """Copy a snapshot hit into a slot of the request's own, so the snapshot stays for the
        next prompt that shares it; only if a slot can be had without evicting it."""
        return (entry is not None and entry.shared
                and (bool(self._free_slots) or self.cache.oldest(entry) is not None))

    def _evict(self, e: Entry) -> None:
        self.cache.remove(e)
        self.block_pool.free_blocks(reversed(e.held))
        self._release_slot(e.slot)

    def _room(self, blocks: int, keep: Entry | None = None) -> int:
        """Free blocks, after evicting least recently used entries (never ``keep``) until
        ``blocks`` are free or no entry is left."""
        free = self.block_pool.get_num_free_blocks()
        while free < blocks and self.cache:
            victim = self.cache.oldest(keep)
            if victim is None:
                break
            self._evict(victim)
            free = self.block_pool.get_num_free_blocks()
        return free
