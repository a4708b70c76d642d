"""The step messages of one engine (vllm_dms.engine.channel): the worker's feedback ring hands out only
a fully landed copy, the newest, once; the scheduler's link keeps the last report and sends its
orders exactly once; a TP step's rows are the fullest rank's pages and the sum of the live
counts. CPU: copies land at once (no events); a fake event stands in for a CUDA copy in flight."""
import pickle

import torch

from vllm_dms.engine.channel import (COLS, INVALID, ORDERS_ATTR, RING, FeedbackRing, SchedulerLink,
                                     StepOrders)
from vllm_dms.worker.runtime import combine_ranks


def rows(n, slot_value):
    t = torch.zeros(5, COLS, dtype=torch.int32)
    t[:, 0] = n
    t[:, 1] = slot_value
    return t


class Pending:
    """A copy that has not landed until done is set."""

    def __init__(self):
        self.done = False

    def query(self):
        return self.done


def test_ring_hands_out_the_newest_landed_copy_once_and_posts_avoid_it():
    ring = FeedbackRing(5)
    assert ring.latest() is None, "nothing posted yet"
    ring.post(rows(10, 1))
    got = ring.latest()
    assert got[1].tolist() == [10, 1, 0, 0] and ring.latest() is None, "each copy once"
    handed = ring._cur
    for step in range(2 * RING):  # posts go round the other buffers, never the one handed out
        ring.post(rows(20 + step, 2))
        assert ring._cur == handed
    assert ring.latest()[1, 0] == 20 + 2 * RING - 1, "the newest post wins"
    got[1, 0] = 99  # a copy: the ring's buffers are not the caller's
    assert all(int(b[1, 0]) != 99 for b in ring._ring)


def test_a_copy_in_flight_is_never_handed_out():
    ring = FeedbackRing(5)
    ring.post(rows(1, 1))
    assert ring.latest()[1, 0] == 1
    ring.post(rows(2, 2))  # lands at once on CPU ...
    newest = max(range(RING), key=lambda j: ring._seq[j])
    ev = ring._events[newest] = Pending()  # ... but pretend it is still in flight
    assert ring.latest() is None, "an unfinished copy is skipped"
    ev.done = True
    assert ring.latest()[1].tolist() == [2, 2, 0, 0]


def test_orders_are_sent_once_and_survive_pickling():
    link = SchedulerLink(5)
    link.release.append(3)
    link.forks.append((4, 2))
    link.snapshots.append((1, 512, 4, 7))
    sent = link.take_orders()
    assert not link.take_orders(), "the next step gets only what was ordered after"
    from vllm.v1.core.sched.output import SchedulerOutput
    out = SchedulerOutput.make_empty()
    setattr(out, ORDERS_ATTR, sent)  # what DMSScheduler.schedule() does
    back = getattr(pickle.loads(pickle.dumps(out)), ORDERS_ATTR)  # the mp executor's queue
    assert back == StepOrders([3], [(4, 2)], [(1, 512, 4, 7)]) and back


def test_scheduler_link_absorbs_reports_and_forgets_owners():
    link = SchedulerLink(5)
    assert link.read_row(2) == (INVALID, 0, 0, 0)
    link.absorb(None)  # a step without a new report keeps the rows
    report = rows(30, 4).numpy()
    report[2, 2:] = (50, 6)
    link.absorb(report)
    assert link.read_row(2) == (30, 4, 50, 6) and link.read_live(2) == (30, 50)
    link.invalidate(2)
    assert link.read(2) == (INVALID, 0) and link.read(1) == (30, 4)


def test_tp_rows_keep_the_fullest_rank_and_sum_the_live_counts():
    tp, S1 = 2, 3
    per_rank = torch.zeros(tp, S1 + 1, COLS, dtype=torch.int32)
    per_rank[:, 1] = torch.tensor([[40, 5, 30, 3], [40, 7, 22, 3]])  # slot 1 on ranks 0, 1
    per_rank[1, S1, 0] = 1  # rank 1's overflow flag
    combined, overflow = combine_ranks(per_rank.view(tp * (S1 + 1), COLS), tp)
    assert combined[1].tolist() == [40, 7, 52, 3]
    assert combined.shape == (S1, COLS) and overflow.tolist() == [1]
