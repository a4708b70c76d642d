"""The feedback ring (vllm_dms.channel): the scheduler only ever reads a fully landed copy, the
newest one, and a post never writes the buffer being read. CPU: copies land at once (no
events); a fake event stands in for a CUDA copy still in flight."""
import torch

from vllm_dms.channel import CHANNEL, COLS, INVALID, RING


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


def test_refresh_reads_the_newest_landed_copy_and_posts_avoid_it():
    CHANNEL.reset()
    CHANNEL.ensure(5)
    assert CHANNEL.read_row(1)[:2] == (INVALID, 0)
    CHANNEL.post(rows(10, 1))
    assert CHANNEL.read_row(1)[:2] == (INVALID, 0), "nothing switches before refresh"
    CHANNEL.refresh()
    assert CHANNEL.read_row(1)[:2] == (10, 1)
    reading = CHANNEL.feedback
    for step in range(2 * RING):  # posts go round the other buffers, never the one being read
        CHANNEL.post(rows(20 + step, 2))
        assert CHANNEL.feedback is reading and CHANNEL.read_row(1)[:2] == (10, 1)
    CHANNEL.refresh()
    assert CHANNEL.read_row(1)[:2] == (20 + 2 * RING - 1, 2), "the newest post wins"
    CHANNEL.reset()


def test_a_copy_in_flight_is_never_read():
    CHANNEL.reset()
    CHANNEL.ensure(5)
    CHANNEL.post(rows(1, 1))
    CHANNEL.refresh()
    CHANNEL.post(rows(2, 2))  # lands at once on CPU ...
    newest = max(range(RING), key=lambda j: CHANNEL._seq[j])
    ev = CHANNEL._events[newest] = Pending()  # ... but pretend it is still in flight
    CHANNEL.refresh()
    assert CHANNEL.read_row(1)[:2] == (1, 1), "an unfinished copy is skipped"
    ev.done = True
    CHANNEL.refresh()
    assert CHANNEL.read_row(1)[:2] == (2, 2)
    CHANNEL.invalidate(1)  # a slot changing owner: forgotten in the buffer being read
    assert CHANNEL.read_row(1)[:2] == (INVALID, 0) and CHANNEL.read_row(2)[:2] == (2, 2)
    CHANNEL.reset()
