"""C.4 rows 14, 15, 22 at the scheduler level (CPU): forced preemption and aborts at each stage.

tests/test_admission_events.py already drives 10,000 random events (random preemptions and
aborts, slot/ledger invariants every step, ledger back to its start). These add what a random
walk cannot pin down: a deterministic tiny arena where growth MUST preempt, the victim's slot on
the releases of that very step's SchedulerOutput, its blocks back in the pool, vLLM's preemption counter
(IterationStats.num_preempted_reqs -> vllm:num_preemptions) moving, and recomputed outputs
equal to an unpreempted run; and one abort per stage returning exactly to the idle baseline.
"""
from test_scheduler import (SimWorker, dms, dms_spec, drive, llama_dir,  # noqa: F401
                            make_request, make_scheduler, make_vllm_config)

from vllm.v1.metrics.stats import IterationStats, LoRARequestStates, RequestStateStats
from vllm.v1.request import RequestStatus

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.engine.channel import ORDERS_ATTR

L, H, D, P, W, SEQS, MAX_LEN = 2, 2, 16, 16, 32, 4, 256


def no_evict(rid, n_prev, live_prev, n):
    return n  # every row keeps every token: reservations only grow


def token(rid: str, pos: int) -> int:
    return (sum(map(ord, rid)) * 31 + pos * 7) % 997  # "greedy": a function of the context


class DetWorker(SimWorker):
    """SimWorker whose sampled token depends on (request, position), like greedy decoding."""

    def step(self, sched, out):
        res = super().step(sched, out)
        res.sampled_token_ids = [
            [token(rid, sched.requests[rid].num_tokens)] if s else []
            for rid, s in zip(res.req_ids, res.sampled_token_ids)]
        return res


def arena(sched_mod, spec_mod, llama_dir, usable: int):
    """A DMS scheduler whose pool has exactly `usable` data blocks after the state region."""
    lay = ArenaLayout(num_layers=L, num_kv_heads=H, head_dim=D, block_size=P, window=W,
                      max_num_seqs=SEQS, max_model_len=MAX_LEN, num_blocks=usable + 1)
    for _ in range(10):
        lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.first_data_block + usable})
    vc = make_vllm_config(llama_dir, max_num_seqs=SEQS, max_num_batched_tokens=MAX_LEN,
                          max_model_len=MAX_LEN)
    spec = dms_spec(spec_mod, heads=H, head_dim=D, block_size=P, window=W, max_num_seqs=SEQS)
    s = make_scheduler(sched_mod.DMSScheduler, vc, spec, L, lay.num_blocks)
    assert s.dms.num_usable == usable
    return s


def run(s, reqs, on_step=None):
    """Drive to completion; returns ({rid: output token ids}, IterationStats over all steps)."""
    for rid, prompt, max_tokens in reqs:
        s.add_request(make_request(rid, prompt, max_tokens))
    worker, got, stats = DetWorker(s.dms, no_evict), {}, IterationStats()
    lora, rstats = LoRARequestStates(), {}

    def collect(step, out, outputs):
        for eco in outputs.values():
            for o in eco.outputs:
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
                stats.update_from_events(o.request_id, o.events or [], False,
                                         rstats.setdefault(o.request_id, RequestStateStats()),
                                         lora, None)
        if on_step:
            on_step(step, out, outputs)
    drive(s, worker.step, 2000, collect)
    return got, stats


REQS = [("a", 60, 180), ("b", 60, 180)]  # each ends at 240 tokens = 15 blocks, unmeasured 16


def test_r14_growth_preempts_victim_slot_released_and_counted(dms, llama_dir):
    spec_mod, sched_mod = dms
    s = arena(sched_mod, spec_mod, llama_dir, usable=20)  # both prefill (4+4), not both finish
    mgr, idle = s.dms, s.dms.block_pool.get_num_free_blocks()
    seen = []

    def on_step(step, out, outputs):
        assert mgr.block_pool.get_num_free_blocks() + mgr.num_held == mgr.num_usable
        for rid in out.preempted_req_ids:
            assert rid not in mgr._slot_of and mgr.held_blocks(rid) == 0
            seen.append(rid)

    real_schedule = s.schedule

    def schedule():  # look at the releases sent with the step in which the scheduler preempted
        slots = dict(mgr._slot_of)
        out = real_schedule()
        sent = getattr(out, ORDERS_ATTR).release
        for rid in out.preempted_req_ids:
            assert slots[rid] in sent, (rid, slots[rid], sent)
        return out
    s.schedule = schedule
    got, stats = run(s, REQS, on_step)
    assert seen, "the arena was sized so that decode growth must preempt"
    assert stats.num_preempted_reqs == len(seen) >= 1  # what vllm:num_preemptions adds up
    assert {rid: len(t) for rid, t in got.items()} == {"a": 180, "b": 180}
    assert mgr.block_pool.get_num_free_blocks() == idle and mgr.num_held == 0
    assert not mgr._slot_of and not mgr.link.release  # the last step sent it


def test_r14_recomputed_outputs_equal_unpreempted_run(dms, llama_dir):
    spec_mod, sched_mod = dms
    tiny, _ = run(arena(sched_mod, spec_mod, llama_dir, usable=20), REQS)
    roomy, stats = run(arena(sched_mod, spec_mod, llama_dir, usable=64), REQS)
    assert stats.num_preempted_reqs == 0
    assert tiny == roomy


def test_r15_abort_at_each_stage_returns_to_idle_baseline(dms, llama_dir):
    spec_mod, sched_mod = dms
    solo, _ = run(arena(sched_mod, spec_mod, llama_dir, usable=40), [("keep", 60, 100)])
    s = arena(sched_mod, spec_mod, llama_dir, usable=40)
    mgr, idle = s.dms, s.dms.block_pool.get_num_free_blocks()
    worker, got = DetWorker(mgr, no_evict), {}

    def step(abort_in_flight=()):
        out = s.schedule()
        wout = worker.step(s, out)
        if abort_in_flight:  # the step is executing when the client goes away (#18485)
            s.finish_requests(list(abort_in_flight), RequestStatus.FINISHED_ABORTED)
        for eco in s.update_from_output(out, wout).values():
            for o in eco.outputs:
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    for rid in ("keep", "dec", "x", "y", "wait"):  # max_num_seqs=4: "wait" stays waiting
        s.add_request(make_request(rid, 60, 100 if rid == "keep" else 50))
    step()
    step()
    assert s.requests["wait"].status == RequestStatus.WAITING
    before = list(mgr.link.release)
    s.finish_requests("wait", RequestStatus.FINISHED_ABORTED)  # never had a slot
    assert mgr.link.release == before
    slot = mgr.slot_of("dec")
    s.finish_requests("dec", RequestStatus.FINISHED_ABORTED)  # mid-decode
    assert mgr.link.release == before + [slot] and mgr.held_blocks("dec") == 0
    s.add_request(make_request("late", 100, 10))
    out = step(abort_in_flight=["late"])  # abort during its prefill step
    assert "late" in out.num_scheduled_tokens
    s.finish_requests(["x", "y"], RequestStatus.FINISHED_ABORTED)
    for rid in ("wait", "dec", "late", "x", "y"):
        assert rid not in s.requests and mgr.slot_of(rid) is None and mgr.held_blocks(rid) == 0
    while s.has_requests():
        step()
    assert got["keep"] == solo["keep"]  # the concurrent request is unaffected
    assert mgr.num_held == 0 and not mgr._slot_of and not mgr.link.release
    assert mgr.block_pool.get_num_free_blocks() == idle
    assert len(worker.released) == 5  # dec, late (its reused slot), x, y, keep: once each
