"""Process-global side channel between the DMS scheduler and the DMS worker (TP=1, one process).

With TP=1 vLLM runs the worker inside the engine-core process (UniProcExecutor), so the scheduler
and the worker can share plain Python objects. Sync scheduling only: schedule(), execute and
update_from_output run one after another in one thread, so no locking is needed.

* ``release``:  slots the scheduler freed (finish, abort, preemption). The worker drains it at the
  start of its next step, before it packs any new request, and pushes the slots' sub-pages back
  to the free stacks.
* ``feedback``: pinned CPU int32 ``[S1, 4]`` tensor, row = slot, columns ``(n_done, pages_max,
  live, tag)``: tokens in the arena, the largest number of sub-pages the slot holds in any one
  layer, the live (token, layer, KV head) entries it holds (the DMS live count summed over layers
  and heads), and the owner tag the slot was last scheduled with (``encode_block_id``). The worker
  overwrites it with one copy after each step; under async scheduling that copy lands one or two
  steps late, possibly after the slot changed owner.
* ``measured``: the ``[S1, 2]`` view ``feedback[:, :2]``; the scheduler trusts a row only if its
  tag is the slot's current generation and ``0 <= n_done <= num_computed_tokens`` (a lagging
  row; ``INVALID`` never qualifies). ``live`` feeds only the metrics.
* ``overflow``: set by the worker when a kernel hit its capacity check (the ledger was violated).
"""
from __future__ import annotations

from typing import Any

INVALID = -1  # n_done of a row that belongs to no measured request
COLS = 4      # n_done, pages_max, live, tag
TAG_GENERATIONS = 256  # owner tags cycle mod this; block id = slot + num_slots * tag


def encode_block_id(slot: int, tag: int, num_slots: int) -> int:
    """The one block id the worker sees for a request: its slot and its owner tag."""
    return slot + num_slots * tag


class DMSChannel:
    def __init__(self) -> None:
        self.release: list[int] = []
        self._feedback: Any = None  # torch.Tensor [S1, COLS] int32, allocated by ensure()
        self._measured: Any = None  # its [S1, 2] view (n_done, pages_max)
        self._rows: Any = None      # numpy view of feedback: per-request reads stay ~100 ns
        self.overflow: bool = False

    @property
    def measured(self) -> Any:
        """The [S1, 2] view; write it in place (no setter: a rebind would orphan readers)."""
        return self._measured

    @property
    def feedback(self) -> Any:
        """The whole [S1, COLS] tensor the worker copies into (one copy per step)."""
        return self._feedback

    def ensure(self, num_slots: int) -> Any:
        """Allocate ``feedback`` for num_slots (= max_num_seqs + 1) rows; idempotent.

        Returns the ``measured`` view.
        """
        if self._feedback is not None:
            if self._feedback.shape[0] != num_slots:
                # Someone may hold a reference to the old tensor; never swap it silently.
                raise ValueError(f"DMS channel already sized for {self._feedback.shape[0]} slots, "
                                 f"asked for {num_slots}")
            return self._measured
        import torch  # lazy: keep the import of this module free of torch / CUDA init
        pin = torch.cuda.is_available()
        m = torch.empty((num_slots, COLS), dtype=torch.int32, pin_memory=pin)
        m[:, 0] = INVALID
        m[:, 1:] = 0
        self._feedback, self._measured, self._rows = m, m[:, :2], m.numpy()
        return self._measured

    def invalidate(self, slot: int) -> None:
        """Forget the measurement of a slot (it changes owner)."""
        if self._rows is not None:
            self._rows[slot] = (INVALID, 0, 0, 0)

    def read(self, slot: int) -> tuple[int, int] | None:
        if self._rows is None:
            return None
        row = self._rows[slot]
        return int(row[0]), int(row[1])

    def read_row(self, slot: int) -> tuple[int, int, int, int] | None:
        """(n_done, pages_max, live, tag) of a slot, all from the same worker copy."""
        if self._rows is None:
            return None
        n_done, pages, live, tag = (int(x) for x in self._rows[slot])
        return n_done, pages, live, tag

    def read_live(self, slot: int) -> tuple[int, int] | None:
        """(n_done, live) of a slot, both from the same worker copy."""
        if self._rows is None:
            return None
        row = self._rows[slot]
        return int(row[0]), int(row[2])

    def take_release(self) -> list[int]:
        """Worker side: drain the freed slots (in the order they were freed)."""
        out, self.release = self.release, []
        return out

    def reset(self) -> None:
        """Forget everything: a new engine in this process (DMSKVCacheManager), or a test."""
        self.release = []
        self._feedback = self._measured = self._rows = None
        self.overflow = False


CHANNEL = DMSChannel()
