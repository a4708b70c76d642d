"""10,000 random admission / step / finish / abort / preempt events through the real Scheduler.

CPU only. VLLM_USE_V2_MODEL_RUNNER=0 (set by the test_scheduler harness); the second case flips
``Scheduler.use_v2_model_runner`` so resumed requests arrive in MRv2's format (as new requests).
The simulated worker (test_scheduler.SimWorker) checks, every step, that it sees exactly [slot]
once per (re)admission, that the releases on the SchedulerOutput are exactly the slots of
finished / preempted requests, that each reservation equals arena.reservation_blocks and covers
the pages it holds. Also: the scheduler's half of the step messages and the dms_stats() gauges.
"""
import random
import time

from test_scheduler import (SimWorker, dms, dms_live_8x, dms_spec, llama_dir,  # noqa: F401
                            make_request, make_scheduler, make_vllm_config)

import pytest
import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.request import RequestStatus

from vllm_dms.engine.channel import INVALID, SchedulerLink

H, D, P, W, SEQS, MAX_LEN, BLOCKS, LAYERS = 2, 16, 16, 32, 16, 1024, 180, 4


@pytest.mark.parametrize("v2_format,num_events", [(False, 10_000), (True, 3_000)])
def test_random_events_keep_the_ledger_exact(dms, llama_dir, v2_format, num_events):
    spec_mod, sched_mod = dms
    rng = random.Random(20260 + v2_format)
    vc = make_vllm_config(llama_dir, max_num_seqs=SEQS, max_num_batched_tokens=256,
                          max_model_len=MAX_LEN)
    spec = spec_mod.DMSCompactSpec(block_size=P, num_kv_heads=H, head_size=D, dtype=torch.uint8,
                                   dms_window=W, dms_max_num_seqs=SEQS)
    sched = make_scheduler(sched_mod.DMSScheduler, vc, spec, LAYERS, BLOCKS)
    sched.use_v2_model_runner = v2_format
    mgr = sched.dms
    state = mgr.layout.first_data_block - 1  # state blocks taken off the pool (block 0 is null)
    initial_free = mgr.block_pool.get_num_free_blocks()
    assert initial_free == mgr.num_usable == BLOCKS - 1 - state

    no_evict: set[str] = set()  # rows that keep every token: reservations stay dense and grow

    def live_fn(rid, n_prev, live_prev, n):
        win = W + 1
        leaving = max(0, n - win) - max(0, n_prev - win)  # tokens that left the window this step
        kept = live_prev - min(n_prev, win)
        burst = rid in no_evict or rng.random() < 0.1  # more growth than the 8x model predicts
        return min(n, win) + kept + (leaving if burst else cdiv(leaving, 8))

    worker = SimWorker(mgr, live_fn, report=lambda rid: rng.random() > 0.05)
    holders: dict[str, int] = {}
    expected_freed: list[int] = []
    manual: set[str] = set()
    stats = dict(steps=0, sched_preemptions=0, manual_preemptions=0, finished=0, admitted=0)
    aborted = dict(waiting=0, preempted=0, prefilling=0, decoding=0)

    def check():
        nonlocal holders
        now = dict(mgr._slot_of)
        expected_freed.extend(s for r, s in holders.items() if now.get(r) != s)
        holders = now
        slots = list(now.values())
        assert len(set(slots)) == len(slots), "two live requests share a slot"
        assert all(1 <= s <= SEQS for s in slots)
        assert set(now) == {r.request_id for r in sched.running}
        assert set(mgr._held) == set(now)
        assert mgr.num_held == sum(mgr.held_blocks(r) for r in now)
        assert mgr.block_pool.get_num_free_blocks() + mgr.num_held + state == BLOCKS - 1
        assert 0.0 <= mgr.usage <= 1.0

    def step():
        if not sched.has_requests():
            return
        out = sched.schedule()
        check()  # a request can be admitted and finish within one step
        stats["steps"] += 1
        stats["sched_preemptions"] += len(out.preempted_req_ids - manual)
        manual.clear()
        outputs = sched.update_from_output(out, worker.step(sched, out))
        stats["finished"] += sum(o.finish_reason is not None
                                 for e in outputs.values() for o in e.outputs)

    for ev in range(num_events):
        x = rng.random()
        if x < 0.20:
            if len(sched.requests) < 40:
                rid = f"e{ev}"
                prompt = rng.choice([rng.randint(1, 40), rng.randint(40, 300),
                                     rng.randint(300, 700)])
                if rng.random() < 0.25:
                    no_evict.add(rid)
                sched.add_request(make_request(rid, prompt, rng.randint(1, 160)))
                stats["admitted"] += 1
        elif x < 0.80:
            step()
        elif x < 0.88 and sched.requests:
            req = sched.requests[rng.choice(sorted(sched.requests))]
            stage = ("preempted" if req.status == RequestStatus.PREEMPTED else
                     "waiting" if req.status == RequestStatus.WAITING else
                     "prefilling" if req.is_prefill_chunk else "decoding")
            aborted[stage] += 1
            sched.finish_requests(req.request_id, RequestStatus.FINISHED_ABORTED)
        elif x < 0.92 and sched.running:
            req = rng.choice(sched.running)
            sched.finish_requests(req.request_id, RequestStatus.FINISHED_STOPPED)
        elif x < 0.985 and sched.running:
            req = rng.choice(sched.running)
            sched.running.remove(req)
            sched._preempt_request(req, time.monotonic())
            manual.add(req.request_id)
            stats["manual_preemptions"] += 1
        elif x >= 0.985:
            manual.update(r.request_id for r in sched.running)
            stats["manual_preemptions"] += len(sched.running)
            assert sched.reset_prefix_cache(reset_running_requests=True)
        check()

    sched.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    check()
    step()  # the worker drains the last releases
    check()
    assert mgr.block_pool.get_num_free_blocks() == initial_free
    assert mgr.num_held == 0 and not mgr._slot_of and not mgr.link.release
    assert sorted(worker.released) == sorted(expected_freed) and expected_freed
    print(f"\n[test3 v2_format={v2_format}] {num_events} events: {stats}, aborted {aborted}, "
          f"slots released {len(worker.released)}")
    assert stats["sched_preemptions"] > 0, "growth beyond the reservation must preempt"
    assert all(aborted.values()), aborted


def test_scheduler_link_and_stats(dms, llama_dir):
    spec_mod, sched_mod = dms
    link = SchedulerLink(5)
    assert link.read(3) == (INVALID, 0) and link.feedback.dtype == torch.int32
    rows = link.feedback.numpy().copy()
    rows[3] = (7, 9, 11, 2)  # a worker report
    link.absorb(rows)
    assert link.read(3) == (7, 9) and link.read_row(3) == (7, 9, 11, 2)
    link.invalidate(3)
    assert link.read(3) == (INVALID, 0)
    with pytest.raises(ValueError, match="another engine"):
        link.absorb(rows[:4])  # a report of another shape is never mixed in
    link.release.append(4)
    sent = link.take_orders()
    assert sent.release == [4] and not link.release and not link.take_orders()

    vc = make_vllm_config(llama_dir, max_num_seqs=4, max_num_batched_tokens=512,
                          max_model_len=1024)
    s = make_scheduler(sched_mod.DMSScheduler, vc, dms_spec(spec_mod, max_num_seqs=4), 16, 400)
    mgr = s.dms
    for i in range(3):
        s.add_request(make_request(f"s{i}", 300, 4))
    worker = SimWorker(mgr, dms_live_8x(256))
    out = s.schedule()
    s.update_from_output(out, worker.step(s, out))
    st = s.dms_stats()
    page, L = mgr.layout.page_bytes, 16
    assert st["num_slots_in_use"] == len(s.running) >= 1
    assert st["reserved_blocks"] == mgr.num_held > 0
    assert st["usable_blocks"] + st["state_blocks"] == 400
    assert st["arena_bytes_total"] == 400 * page * L
    assert st["arena_bytes_in_use"] == (st["state_blocks"] + mgr.num_held) * page * L
    assert st["live_tokens"] is None and st["measured_subpages_max"] > 0
    assert s.make_stats().kv_cache_usage == mgr.num_held / mgr.num_usable
