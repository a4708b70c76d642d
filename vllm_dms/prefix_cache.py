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
Design and next steps (snapshots of shared prefixes, ``kernels/fork.py``):
benchmarks/PREFIX_CACHING_DESIGN.md.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

KEY_TOKENS = 16  # entries are bucketed by their first tokens; a hit compares all L tokens


@dataclasses.dataclass
class Entry:
    slot: int
    tokens: tuple[int, ...]            # the L tokens whose DMS state the slot's rows hold
    held: list[Any]                    # the ledger blocks (vLLM KVCacheBlock) of those rows
    measured: tuple[int, int] | None   # (n_done, pages_max) last reported for the rows


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
            if L <= max_len and (best is None or L > len(best.tokens)) and \
                    tuple(tokens[:L]) == e.tokens:
                best = e
        return best

    def remove(self, e: Entry) -> Entry:
        del self._lru[e.slot]
        bucket = self._buckets[e.tokens[:KEY_TOKENS]]
        bucket.remove(e)
        if not bucket:
            del self._buckets[e.tokens[:KEY_TOKENS]]
        self.num_blocks -= len(e.held)
        return e

    def touch(self, e: Entry) -> None:
        self._lru.move_to_end(e.slot)

    def oldest(self) -> Entry | None:
        return next(iter(self._lru.values()), None)

    def entries(self) -> list[Entry]:
        return list(self._lru.values())
