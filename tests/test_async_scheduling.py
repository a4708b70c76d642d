"""DMSAsyncScheduler through vLLM's real AsyncScheduler, driven like EngineCore's batch queue.

Each step: schedule N+1, "execute" it (the simulated worker drains releases, learns slots and
owner tags from block ids, checks the reservation against its true usage, then queues its
measurement to land 0-2 steps late), and only then update_from_output(N). Stale rows of a
slot's previous owners keep landing after reassignment. CPU only. Also: tag decoding in the
builder (several generations, padding rows).
"""
import random
from collections import deque

from test_scheduler import (dms, llama_dir, make_request, make_scheduler,  # noqa: F401
                            make_vllm_config, runner_output)

import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.request import RequestStatus

from vllm_dms.engine.channel import (COLS, FEEDBACK_ATTR, INVALID, ORDERS_ATTR, TAG_GENERATIONS,
                                     encode_block_id)

H, D, P, W, SEQS, MAX_LEN, BLOCKS, LAYERS = 2, 16, 16, 32, 16, 1024, 180, 4


class LaggingWorker:
    """The DMS worker under async scheduling: its rows land late (sometimes stale copies) in
    its host table, whose newest state rides on each ModelRunnerOutput it returns."""

    def __init__(self, mgr, rng, live_fn):
        self.mgr, self.lay, self.rng, self.live_fn = mgr, mgr.layout, rng, live_fn
        self.slot: dict[str, int] = {}
        self.tag: dict[str, int] = {}
        self.live: dict[str, tuple[int, int]] = {}  # rid -> (tokens in the arena, live per row)
        self.pending: list[tuple[int, int, list[int]]] = []  # (lands at exec #, slot, row)
        self.history: deque = deque(maxlen=64)  # recent (slot, row): replayed as stale copies
        self.execs = self.released = self.measured_steps = self.stale_rows = 0
        self.rows = torch.zeros(self.lay.num_slots, COLS, dtype=torch.int32)  # landed copies
        self.rows[:, 0] = INVALID

    def execute(self, sched, out):
        S1 = self.lay.num_slots
        drained = getattr(out, ORDERS_ATTR).release  # applied before any pack of this step
        self.released += len(drained)
        gone = out.finished_req_ids | out.preempted_req_ids
        expect = [self.slot.pop(r) for r in gone if r in self.slot]
        for r in gone:
            self.tag.pop(r, None)
            self.live.pop(r, None)
        assert sorted(drained) == sorted(expect), (drained, expect)
        c = out.scheduled_cached_reqs
        new = [(r.req_id, r.block_ids) for r in out.scheduled_new_reqs]
        new += [(rid, c.new_block_ids[i]) for i, rid in enumerate(c.req_ids)
                if rid in c.resumed_req_ids]
        for rid, ids in new:
            assert len(ids) == 1 and len(ids[0]) == 1 and rid not in self.slot, (rid, ids)
            self.slot[rid], self.tag[rid] = ids[0][0] % S1, ids[0][0] // S1
            self.live[rid] = (0, 0)
        assert self.slot == self.mgr._slot_of
        assert len(set(self.slot.values())) == len(self.slot), "two live requests share a slot"
        for rid, k in out.num_scheduled_tokens.items():
            n_prev, live_prev = self.live[rid]
            n = n_prev + k
            live = self.live_fn(rid, n_prev, live_prev, n)
            self.live[rid] = (n, live)
            pages = H * cdiv(live, P)
            held = self.mgr.held_blocks(rid)
            # The reservation covers what this step will hold on the GPU when it runs.
            assert pages <= H * held, (rid, n, pages, held)
            self.measured_steps += held < cdiv(n, P)
            row = [n, pages, live, self.tag[rid]]
            self.pending.append((self.execs + self.rng.choice((0, 1, 1, 2)), self.slot[rid], row))
            self.history.append((self.slot[rid], row))
        assert sum(H * cdiv(lv, P) for _, lv in self.live.values()) <= self.lay.num_data_subpages
        out_now = runner_output(sched, out)  # sampled now; the scheduler sees it a step later
        self.land()
        self.execs += 1
        setattr(out_now, FEEDBACK_ATTR, self.rows.numpy().copy())  # what has landed so far
        return out_now

    def land(self):
        due = [p for p in self.pending if p[0] <= self.execs]
        self.pending = [p for p in self.pending if p[0] > self.execs]
        if self.history and self.rng.random() < 0.2:  # an old copy of any recent owner lands
            slot, row = self.rng.choice(self.history)
            due.append((0, slot, row))
        for _, slot, row in due:
            owner = next((r for r, s in self.slot.items() if s == slot), None)
            self.stale_rows += owner is None or self.tag[owner] != row[3]
            self.rows[slot] = torch.tensor(row, dtype=torch.int32)


def test_async_random_events_with_lagging_measurements(dms, llama_dir):  # noqa: F811
    spec_mod, sched_mod = dms
    rng = random.Random(4242)
    vc = make_vllm_config(llama_dir, max_num_seqs=SEQS, max_num_batched_tokens=256,
                          max_model_len=MAX_LEN, async_scheduling=True)
    spec = spec_mod.DMSCompactSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.uint8,
                                   dms_window=W, dms_max_num_seqs=SEQS)
    sched = make_scheduler(sched_mod.DMSAsyncScheduler, vc, spec, LAYERS, BLOCKS)
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    assert isinstance(sched, AsyncScheduler)
    mgr = sched.dms
    state = mgr.layout.first_data_block - 1
    initial_free = mgr.block_pool.get_num_free_blocks()
    no_evict: set[str] = set()

    def live_fn(rid, n_prev, live_prev, n):
        win = W + 1
        leaving = max(0, n - win) - max(0, n_prev - win)
        kept = live_prev - min(n_prev, win)
        burst = rid in no_evict or rng.random() < 0.1
        return min(n, win) + kept + (leaving if burst else cdiv(leaving, 8))

    worker = LaggingWorker(mgr, rng, live_fn)
    queue: deque = deque()  # (SchedulerOutput, ModelRunnerOutput) in flight, oldest right
    stats = dict(steps=0, preempted=0, finished=0)

    def check():
        slots = list(mgr._slot_of.values())
        assert len(set(slots)) == len(slots), "two live requests share a slot"
        assert set(mgr._held) == set(mgr._slot_of)
        assert mgr.num_held == sum(mgr.held_blocks(r) for r in mgr._slot_of)
        assert mgr.block_pool.get_num_free_blocks() + mgr.num_held + state == BLOCKS - 1

    def update_oldest():
        out, mro = queue.pop()
        outputs = sched.update_from_output(out, mro)
        stats["finished"] += sum(o.finish_reason is not None
                                 for e in outputs.values() for o in e.outputs)

    def step():
        if sched.has_requests():  # EngineCore.step_with_batch_queue, batch_queue_size 2
            out = sched.schedule()
            check()
            stats["steps"] += 1
            stats["preempted"] += len(out.preempted_req_ids)
            queue.appendleft((out, worker.execute(sched, out)))
            if len(queue) < 2:
                return
        if queue:
            update_oldest()

    for ev in range(6000):
        x = rng.random()
        if x < 0.20:
            if len(sched.requests) < 40:
                rid = f"a{ev}"
                if rng.random() < 0.25:
                    no_evict.add(rid)
                prompt = rng.choice([rng.randint(1, 40), rng.randint(40, 300),
                                     rng.randint(300, 700)])
                sched.add_request(make_request(rid, prompt, rng.randint(1, 160)))
        elif x < 0.85:
            step()
        elif x < 0.93 and sched.requests:  # abort between schedule and update (EngineCore too)
            sched.finish_requests(rng.choice(sorted(sched.requests)),
                                  RequestStatus.FINISHED_ABORTED)
        elif x < 0.995 and sched.running:
            sched.finish_requests(rng.choice(sched.running).request_id,
                                  RequestStatus.FINISHED_STOPPED)
        elif x >= 0.995:
            assert sched.reset_prefix_cache(reset_running_requests=True)
        check()

    sched.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    while queue:
        update_oldest()
    check()
    sched.add_request(make_request("last", 5, 1))  # one more executed step drains the releases
    while sched.has_requests() or queue:
        step()
    check()
    assert mgr.block_pool.get_num_free_blocks() == initial_free
    assert mgr.num_held == 0 and not mgr._slot_of and not mgr.link.release
    print(f"\n[async] {stats}, released {worker.released}, measured steps "
          f"{worker.measured_steps}, stale rows {worker.stale_rows}")
    assert stats["preempted"] > 0 and stats["finished"] > 0
    assert worker.measured_steps > 0, "lagging measurements must still shrink reservations"
    assert worker.stale_rows > 0, "stale rows of previous owners must have landed"


def test_stale_row_of_previous_owner_is_ignored(dms, llama_dir):  # noqa: F811
    spec_mod, sched_mod = dms
    vc = make_vllm_config(llama_dir, max_num_seqs=2, max_num_batched_tokens=512,
                          max_model_len=512, async_scheduling=True)
    spec = spec_mod.DMSCompactSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.uint8,
                                   dms_window=W, dms_max_num_seqs=2)
    sched = make_scheduler(sched_mod.DMSAsyncScheduler, vc, spec, LAYERS, 200)
    mgr, S1 = sched.dms, sched.dms.layout.num_slots
    sched.add_request(make_request("old", 300, 50))
    out = sched.schedule()
    slot, gen = mgr.slot_of("old"), mgr._gen[mgr.slot_of("old")]
    assert out.scheduled_new_reqs[0].block_ids == ([encode_block_id(slot, gen, S1)],)
    sched.finish_requests("old", RequestStatus.FINISHED_ABORTED)
    sched.add_request(make_request("new", 300, 50))
    sched.schedule()
    assert mgr.slot_of("new") == slot and mgr._gen[slot] == (gen + 1) % TAG_GENERATIONS
    req = sched.requests["new"]
    # The old owner's copy (n_done 300, 1 page) lands late: tag mismatch, worst case kept.
    mgr.link.feedback[slot] = torch.tensor([300, 1, 0, gen], dtype=torch.int32)
    assert mgr._measured(req, slot) is None
    mgr.link.feedback[slot] = torch.tensor([300, 1, 0, mgr._gen[slot]], dtype=torch.int32)
    assert mgr._measured(req, slot) == (300, 1)
    mgr.link.feedback[slot] = torch.tensor([299, 1, 0, mgr._gen[slot]], dtype=torch.int32)
    assert mgr._measured(req, slot) == (299, 1)  # lagging: reservation adds the growth
    mgr.link.feedback[slot] = torch.tensor([301, 1, 0, mgr._gen[slot]], dtype=torch.int32)
    assert mgr._measured(req, slot) is None  # ahead of the scheduler: not this state
    assert mgr.layout.reservation_blocks(302, (299, 1)) == 1 + cdiv(3, P)


def test_sync_scheduler_refuses_async_config_and_back(dms, llama_dir):  # noqa: F811
    import pytest
    spec_mod, sched_mod = dms
    for cls, async_ in ((sched_mod.DMSScheduler, True), (sched_mod.DMSAsyncScheduler, False)):
        vc = make_vllm_config(llama_dir, max_num_seqs=2, max_num_batched_tokens=512,
                              max_model_len=512, async_scheduling=async_)
        spec = spec_mod.DMSCompactSpec(block_size=P, num_kv_heads=H, head_size=D,
                                       dtype=torch.uint8, dms_window=W, dms_max_num_seqs=2)
        with pytest.raises(ValueError, match="async_scheduling"):
            make_scheduler(cls, vc, spec, LAYERS, 200)


def test_tagged_block_id_bound_checked_at_startup(dms, llama_dir):  # noqa: F811
    import pytest

    from vllm_dms.engine.config import DMSConfigError
    spec_mod, sched_mod = dms
    seqs, bs = 4096, 2048  # 4097 * 256 * 2048 >= 2**31
    vc = make_vllm_config(llama_dir, max_num_seqs=seqs, max_num_batched_tokens=4096,
                          max_model_len=2048, block_size=bs)
    spec = spec_mod.DMSCompactSpec(block_size=bs, num_kv_heads=1, head_size=16,
                                   dtype=torch.uint8, dms_window=W, dms_max_num_seqs=seqs)
    with pytest.raises(DMSConfigError, match="int32"):
        make_scheduler(sched_mod.DMSScheduler, vc, spec, 1, 200)


def test_builder_decodes_slot_and_tag():
    from vllm_dms.worker.backend import decode_block_ids
    S1 = 5
    pairs = [(1, 1), (4, 255), (2, 0), (3, 17), (0, 0), (0, 0)]  # last two: padding (block 0)
    ids = torch.tensor([encode_block_id(s, g, S1) for s, g in pairs], dtype=torch.int32)
    out = torch.full((6,), -1, dtype=torch.int32)
    tags = torch.full((S1,), -7, dtype=torch.int32)
    slots = decode_block_ids(ids, S1, out, tags)
    assert slots is out and slots.tolist() == [s for s, _ in pairs]
    assert tags.tolist() == [0, 1, 0, 17, 255]  # slot 0 only ever gets padding's tag 0
    # A slot re-used at a later generation: the newest build wins.
    decode_block_ids(torch.tensor([encode_block_id(4, 3, S1)], dtype=torch.int32), S1,
                     out[:1], tags)
    assert out[0] == 4 and tags[4] == 3
