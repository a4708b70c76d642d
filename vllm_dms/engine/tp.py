"""Tensor-parallel layout of DMS state: which KV heads, borrowed lanes and arena rows each rank owns.

vLLM shards attention heads contiguously: with tp ranks, rank r holds query heads
[r*Hq/tp, (r+1)*Hq/tp) and KV heads [r*Hkv/tp, (r+1)*Hkv/tp) (Hkv divisible by tp). The
borrowed lane of KV head h lives in query head h*G, the first head of h's own group, so it is
always on the rank that holds h: decisions, flags, arena rows and decode attention are
rank-local. Retention differs per head, so each rank measures its own footprint and a
request's reservation must cover the fullest rank (``reservation_over_ranks``).
"""
from __future__ import annotations

import dataclasses

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.engine.config import DMSConfig, DMSConfigError


@dataclasses.dataclass(frozen=True)
class RankHeads:
    rank: int
    kv_heads: tuple[int, ...]        # global KV head ids held by this rank
    q_heads: tuple[int, ...]         # global query head ids held by this rank
    borrowed_local: tuple[int, ...]  # local query-head index of each local KV head's lane


def shard_heads(dms: DMSConfig, tp_size: int) -> list[RankHeads]:
    """Per-rank head ownership; refuses a TP size that does not divide the KV heads."""
    hq, hkv, g = dms.num_q_heads, dms.num_kv_heads, dms.group
    if tp_size < 1 or hkv % tp_size:
        raise DMSConfigError(
            f"--tensor-parallel-size {tp_size}: must divide num_key_value_heads={hkv} with "
            f"dms_fp8 (each KV head and its borrowed decision lane must live on one rank); "
            f"use one of {[t for t in range(1, hkv + 1) if hkv % t == 0]}")
    kv_per, q_per = hkv // tp_size, hq // tp_size
    ranks = []
    for r in range(tp_size):
        kv = tuple(range(r * kv_per, (r + 1) * kv_per))
        q = tuple(range(r * q_per, (r + 1) * q_per))
        ranks.append(RankHeads(r, kv, q, tuple(h * g - q[0] for h in kv)))
    return ranks


def rank_layout(layout: ArenaLayout, tp_size: int) -> ArenaLayout:
    """The arena layout one rank allocates: only its KV heads."""
    return dataclasses.replace(layout, num_kv_heads=layout.num_kv_heads // tp_size)


def reservation_over_ranks(layout: ArenaLayout, n_tokens: int,
                           measured: list[tuple[int, int] | None]) -> int:
    """Blocks a request must hold: the reservation of its fullest rank (one ledger for all)."""
    return max(layout.reservation_blocks(n_tokens, m) for m in measured)
