"""Process-global side channel between the DMS scheduler and the DMS worker (TP=1, one process).

With TP=1 vLLM runs the worker inside the engine-core process (UniProcExecutor), so the scheduler
and the worker can share plain Python objects. Sync scheduling only: schedule(), execute and
update_from_output run one after another in one thread, so no locking is needed.

* ``release``:  slots the scheduler freed (finish, abort, preemption). The worker drains it at the
  start of its next step, before it packs any new request, and pushes the slots' sub-pages back
  to the free stacks.
* ``measured``: CPU int32 ``[S1, 2]`` tensor, row = slot, columns ``(n_done, pages_max)``: tokens in
  the arena and the largest number of sub-pages the slot holds in any one layer. The worker
  overwrites the rows of the requests it ran after each step; the scheduler trusts a row only if
  ``n_done`` equals the request's ``num_computed_tokens`` (``INVALID`` never matches).
* ``overflow``: set by the worker when a kernel hit its capacity check (the ledger was violated).
"""
from __future__ import annotations

from typing import Any

INVALID = -1  # n_done of a row that belongs to no measured request


class DMSChannel:
    def __init__(self) -> None:
        self.release: list[int] = []
        self._measured: Any = None  # torch.Tensor [S1, 2] int32, allocated by ensure()
        self._rows: Any = None      # numpy view of it: per-request reads stay ~100 ns
        self.overflow: bool = False

    @property
    def measured(self) -> Any:
        """The [S1, 2] tensor; write it in place (no setter: a rebind would orphan readers)."""
        return self._measured

    def ensure(self, num_slots: int) -> Any:
        """Allocate ``measured`` for num_slots (= max_num_seqs + 1) rows; idempotent."""
        if self._measured is not None:
            if self._measured.shape[0] != num_slots:
                # Someone may hold a reference to the old tensor; never swap it silently.
                raise ValueError(f"DMS channel already sized for {self._measured.shape[0]} slots, "
                                 f"asked for {num_slots}")
            return self._measured
        import torch  # lazy: keep the import of this module free of torch / CUDA init
        pin = torch.cuda.is_available()
        m = torch.empty((num_slots, 2), dtype=torch.int32, pin_memory=pin)
        m[:, 0] = INVALID
        m[:, 1] = 0
        self._measured, self._rows = m, m.numpy()
        return m

    def invalidate(self, slot: int) -> None:
        """Forget the measurement of a slot (it changes owner)."""
        if self._rows is not None:
            self._rows[slot] = (INVALID, 0)

    def read(self, slot: int) -> tuple[int, int] | None:
        if self._rows is None:
            return None
        row = self._rows[slot]
        return int(row[0]), int(row[1])

    def take_release(self) -> list[int]:
        """Worker side: drain the freed slots (in the order they were freed)."""
        out, self.release = self.release, []
        return out

    def reset(self) -> None:
        """Tests only: forget everything (a new engine in the same process)."""
        self.release = []
        self._measured = self._rows = None
        self.overflow = False


CHANNEL = DMSChannel()
