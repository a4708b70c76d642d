"""Process-global side channel between the DMS scheduler and the DMS worker (TP=1, one process).

With TP=1 vLLM runs the worker inside the engine-core process (UniProcExecutor), so the scheduler
and the worker share plain Python objects. schedule(), the worker's metadata build / forward and
update_from_output run in one thread (also with async scheduling: only the GPU runs ahead), so no
locking is needed; what can race is a device-to-host copy still landing, handled by the ring.

* ``release``:  slots the scheduler freed (finish, abort, preemption). The worker drains it at the
  start of its next step, before it packs any new request, and pushes the slots' sub-pages back
  to the free stacks.
* ``feedback``: pinned CPU int32 ``[S1, 4]`` tensor, row = slot, columns ``(n_done, pages_max,
  live, tag)``: tokens in the arena, the largest number of sub-pages the slot holds in any one
  layer, the live (token, layer, KV head) entries it holds (the DMS live count summed over layers
  and heads), and the owner tag the slot was last scheduled with (``encode_block_id``).
  It is one of ``RING`` buffers: ``post`` (worker) enqueues a non-blocking copy of the device
  feedback into the oldest buffer that is not being read and records a CUDA event; ``refresh``
  (scheduler, start of each schedule) switches to the newest buffer whose copy has landed. So a
  read never sees a half-landed copy, and a snapshot may lag one or two steps (possibly from
  before the slot changed owner: the tag tells).
* ``measured``: the ``[S1, 2]`` view ``feedback[:, :2]``; the scheduler trusts a row only if its
  tag is the slot's current generation and ``0 <= n_done <= num_computed_tokens`` (a lagging
  row; ``INVALID`` never qualifies). ``live`` feeds only the metrics.
* ``forks``: (cache slot, request slot) pairs: copy the rows of a prefix snapshot into the empty
  rows of a request that hit it, at the start of the worker's next step (after ``release``,
  before any kernel of the step), so the snapshot stays shared.
* ``overflow``: set by the worker when a kernel hit its capacity check (the ledger was violated).
"""
from __future__ import annotations

from typing import Any

INVALID = -1  # n_done of a row that belongs to no measured request
COLS = 4      # n_done, pages_max, live, tag
RING = 3      # feedback buffers: one read, one landing, one free
TAG_GENERATIONS = 256  # owner tags cycle mod this; block id = slot + num_slots * tag


def encode_block_id(slot: int, tag: int, num_slots: int) -> int:
    """The one block id the worker sees for a request: its slot and its owner tag."""
    return slot + num_slots * tag


class DMSChannel:
    def __init__(self) -> None:
        self.release: list[int] = []
        # (request slot, L, cache slot, cache tag): pack the first L tokens of that request's
        # first prefill chunk, this step, into the cache slot (a prefix snapshot)
        self.snapshots: list[tuple[int, int, int, int]] = []
        self.forks: list[tuple[int, int]] = []  # (cache slot, request slot): copy the rows
        self.overflow: bool = False
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._ring: list[Any] = []    # RING pinned [S1, COLS] int32 tensors
        self._events: list[Any] = []  # CUDA event recorded after each buffer's latest copy
        self._seq: list[int] = []     # post number of each buffer's latest copy (0: never)
        self._posts = 0
        self._cur = 0                 # the buffer the scheduler reads
        self._feedback = self._measured = self._rows = None

    @property
    def measured(self) -> Any:
        """The [S1, 2] view of the buffer being read (n_done, pages_max); write it in place."""
        return self._measured

    @property
    def feedback(self) -> Any:
        """The [S1, COLS] buffer the scheduler reads now (tests write worker rows into it)."""
        return self._feedback

    def ensure(self, num_slots: int) -> Any:
        """Allocate the ring for num_slots (= max_num_seqs + 1) rows; idempotent.

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
        for _ in range(RING):
            m = torch.empty((num_slots, COLS), dtype=torch.int32, pin_memory=pin)
            m[:, 0] = INVALID
            m[:, 1:] = 0
            self._ring.append(m)
            self._events.append(None)
            self._seq.append(0)
        self._select(0)
        return self._measured

    def _select(self, i: int) -> None:
        m = self._ring[i]
        self._cur, self._feedback, self._measured, self._rows = i, m, m[:, :2], m.numpy()

    def post(self, device_feedback: Any) -> None:
        """Worker: copy the device feedback [S1, COLS] into the ring (non-blocking on CUDA).

        Never inside CUDA-graph capture (the destination alternates); the caller checks.
        """
        import torch
        i = min((j for j in range(RING) if j != self._cur), key=lambda j: self._seq[j])
        self._posts += 1
        self._ring[i].copy_(device_feedback, non_blocking=True)
        self._seq[i] = self._posts
        if device_feedback.is_cuda:
            ev = self._events[i] or torch.cuda.Event()
            ev.record()
            self._events[i] = ev

    def refresh(self) -> None:
        """Scheduler: read the newest buffer whose copy has fully landed (never blocks)."""
        best = self._cur
        for j in range(len(self._ring)):
            if self._seq[j] > self._seq[best] and (self._events[j] is None
                                                   or self._events[j].query()):
                best = j
        if best != self._cur:
            self._select(best)

    def invalidate(self, slot: int) -> None:
        """Forget the measurement of a slot (it changes owner)."""
        if self._rows is not None:
            self._rows[slot] = (INVALID, 0, 0, 0)

    def read_row(self, slot: int) -> tuple[int, int, int, int] | None:
        """(n_done, pages_max, live, tag) of a slot, all from the same worker copy."""
        if self._rows is None:
            return None
        n_done, pages, live, tag = (int(x) for x in self._rows[slot])
        return n_done, pages, live, tag

    def take_release(self) -> list[int]:
        """Worker side: drain the freed slots (in the order they were freed)."""
        out, self.release = self.release, []
        return out

    def take_snapshots(self) -> list[tuple[int, int, int, int]]:
        """Worker side: drain this step's prefix-snapshot orders."""
        out, self.snapshots = self.snapshots, []
        return out

    def take_forks(self) -> list[tuple[int, int]]:
        """Worker side: drain this step's fork orders."""
        out, self.forks = self.forks, []
        return out

    def reset(self) -> None:
        """Forget everything: a new engine in this process (DMSKVCacheManager), or a test."""
        self.release = []
        self.snapshots = []
        self.forks = []
        self.overflow = False
        self._reset_buffers()


CHANNEL = DMSChannel()
