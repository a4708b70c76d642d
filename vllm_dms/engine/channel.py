"""What the DMS scheduler and the DMS worker of one engine tell each other, in vLLM's step messages.

No process-wide state: each engine's scheduler (``DMSKVCacheManager.link``) and each of its
workers (``vllm_dms.worker.runtime.WorkerLink``) own their half, so the worker may live in the
engine core (UniProcExecutor), in a process of its own (MultiprocExecutor, any TP rank), and
several engines may share one process.

* Scheduler -> worker: ``StepOrders`` set by ``DMSScheduler.schedule()`` on the
  ``SchedulerOutput`` it returns (attribute ``ORDERS_ATTR``; a plain dataclass attribute, so it
  is passed as is in process and pickled with the output by the MultiprocExecutor's queue):

  * ``release``: slots freed since the last schedule (finish, abort, preemption, entry
    eviction). The worker pushes their sub-pages back to the free stacks before the step's
    forward, so before it packs anything.
  * ``forks``: (cache slot, request slot): copy a prefix snapshot's rows into the empty rows of
    a request that hit it, before the step's forward (after ``release``).
  * ``snapshots``: (request slot, L, cache slot, cache tag): pack the first L tokens of that
    request's first prefill chunk, this step, into the cache slot.

* Worker -> scheduler: rows ``[S1, COLS]`` int32, row = slot, columns ``(n_done, pages_max,
  live, tag)``: tokens in the arena, the largest number of sub-pages the slot holds in any one
  layer (the fullest TP rank's), the live (token, layer, KV head) entries (summed over ranks),
  and the owner tag the slot was last scheduled with (``encode_block_id``). They ride on the
  ``ModelRunnerOutput`` (attribute ``FEEDBACK_ATTR``; only the output rank's reaches the
  scheduler, so TP ranks combine theirs first). The worker copies the device rows into a
  ``FeedbackRing`` after each forward and attaches the newest copy that has fully landed, so a
  report may lag a step or two (async scheduling) and may predate a slot's change of owner: the
  scheduler trusts a row only if its tag is the slot's current generation and
  ``0 <= n_done <= num_computed_tokens`` (``INVALID`` never qualifies).
"""
from __future__ import annotations

import dataclasses
from typing import Any

INVALID = -1  # n_done of a row that belongs to no measured request
COLS = 4      # n_done, pages_max, live, tag
RING = 3      # feedback buffers: one read, one landing, one free
TAG_GENERATIONS = 256  # owner tags cycle mod this; block id = slot + num_slots * tag
ORDERS_ATTR = "dms_orders"      # on vLLM's SchedulerOutput
FEEDBACK_ATTR = "dms_feedback"  # on vLLM's ModelRunnerOutput


def encode_block_id(slot: int, tag: int, num_slots: int) -> int:
    """The one block id the worker sees for a request: its slot and its owner tag."""
    return slot + num_slots * tag


@dataclasses.dataclass
class StepOrders:
    release: list[int] = dataclasses.field(default_factory=list)
    forks: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    snapshots: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.release or self.forks or self.snapshots)


class SchedulerLink:
    """The scheduler's half: orders not yet sent, and the newest rows the worker reported."""

    def __init__(self, num_slots: int) -> None:
        import torch  # lazy: keep the import of this module free of torch
        self.orders = StepOrders()
        self.feedback = torch.empty((num_slots, COLS), dtype=torch.int32)  # tests write rows
        self.feedback[:, 0] = INVALID
        self.feedback[:, 1:] = 0
        self._rows = self.feedback.numpy()  # shares memory: reads without torch overhead

    @property
    def release(self) -> list[int]:
        return self.orders.release

    @property
    def forks(self) -> list[tuple[int, int]]:
        return self.orders.forks

    @property
    def snapshots(self) -> list[tuple[int, int, int, int]]:
        return self.orders.snapshots

    def take_orders(self) -> StepOrders:
        """Everything ordered since the last schedule, for the SchedulerOutput being returned."""
        out, self.orders = self.orders, StepOrders()
        return out

    def absorb(self, rows: Any) -> None:
        """A worker report ([S1, COLS] int32, from a ModelRunnerOutput) replaces the rows."""
        if rows is None:
            return
        if tuple(rows.shape) != tuple(self._rows.shape):
            raise ValueError(f"DMS worker reported {tuple(rows.shape)} rows, the scheduler has "
                             f"{tuple(self._rows.shape)} (another engine's worker?)")
        self._rows[:] = rows

    def invalidate(self, slot: int) -> None:
        """Forget the measurement of a slot (it changes owner)."""
        self._rows[slot] = (INVALID, 0, 0, 0)

    # ndarray.tolist(): one C call per row, the scheduler reads a row per running request
    def read(self, slot: int) -> tuple[int, int]:
        n_done, pages, _, _ = self._rows[slot].tolist()
        return n_done, pages

    def read_row(self, slot: int) -> tuple[int, int, int, int]:
        """(n_done, pages_max, live, tag) of a slot, all from the same worker copy."""
        n_done, pages, live, tag = self._rows[slot].tolist()
        return n_done, pages, live, tag

    def read_live(self, slot: int) -> tuple[int, int]:
        """(n_done, live) of a slot, both from the same worker copy."""
        n_done, _, live, _ = self._rows[slot].tolist()
        return n_done, live


class FeedbackRing:
    """The worker's host copies of its device rows: ``RING`` buffers (pinned on CUDA), each
    with the event recorded after its latest copy. ``post`` never writes the buffer last
    handed out; ``latest`` hands out the newest buffer whose copy has landed (never blocks)."""

    def __init__(self, num_slots: int) -> None:
        import torch
        pin = torch.cuda.is_available()
        self._ring = []
        for _ in range(RING):
            m = torch.empty((num_slots, COLS), dtype=torch.int32, pin_memory=pin)
            m[:, 0] = INVALID
            m[:, 1:] = 0
            self._ring.append(m)
        self._events: list[Any] = [None] * RING  # None: a CPU copy, landed at once
        self._seq = [0] * RING  # post number of each buffer's latest copy (0: never)
        self._posts = 0
        self._cur = 0       # the buffer last handed out
        self._handed = 0    # its post number

    def post(self, device_rows: Any) -> None:
        """Copy the device rows [S1, COLS] into the ring (non-blocking on CUDA); never inside
        CUDA-graph capture (the destination alternates); the caller checks."""
        import torch
        i = min((j for j in range(RING) if j != self._cur), key=lambda j: self._seq[j])
        self._seq[i] = 0  # being rewritten: not a candidate until its event is recorded
        self._ring[i].copy_(device_rows, non_blocking=True)
        if device_rows.is_cuda:
            ev = self._events[i] = torch.cuda.Event()
            ev.record()
        self._posts += 1
        self._seq[i] = self._posts

    def latest(self) -> Any:
        """A numpy copy of the newest landed rows, or None if nothing newer than last time."""
        best = self._cur
        for j in range(RING):
            if self._seq[j] > self._seq[best] and (self._events[j] is None
                                                   or self._events[j].query()):
                best = j
        if self._seq[best] <= self._handed:
            return None
        self._cur, self._handed = best, self._seq[best]
        return self._ring[best].numpy().copy()  # the output may be read after later posts
