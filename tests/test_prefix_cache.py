"""DMS prefix reuse (``--enable-prefix-caching``) through vLLM's real Scheduler on CPU.

A finished request's rows become an entry; a prompt that extends its tokens takes the entry
(same slot, its blocks, L computed tokens); entries are evicted LRU for blocks or slots, and
every block and slot is accounted for after every step. VLLM_USE_V2_MODEL_RUNNER=0 (set by the
test_scheduler harness).
"""
import random
import types

import torch

from test_scheduler import (RowsWorker, dms, dms_live_8x, dms_spec, llama_dir,  # noqa: F401
                            make_scheduler, make_vllm_config, runner_output)
from vllm.v1.request import Request, RequestStatus
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher

from vllm_dms.engine.channel import FEEDBACK_ATTR, ORDERS_ATTR
from vllm_dms.worker.runtime import WorkerLink

LAYERS, SEQS, MAX_LEN, W = 16, 4, 512, 16


class Worker(RowsWorker):
    """The DMS worker's view, checked: releases drained, snapshot orders only for a first chunk
    and never onto a request's slot, forks only from shared entries, the ledger covers the rows."""

    token = 7

    def __init__(self, mgr):
        super().__init__(mgr, dms_live_8x(W))
        self.released, self.first_computed, self.orders, self.forks = [], {}, [], []
        self.pack_snapshots = True  # False: every order's request is missing from the batch
        self.first = {}  # slot -> the new request of this step that starts from token 0

    def learn(self, out, orders):
        super().learn(out, orders)
        self.released += orders.release
        for r in out.scheduled_new_reqs:
            self.first_computed[r.req_id] = r.num_computed_tokens
        cached = {e.slot: e for e in self.mgr.cache.entries()}
        for src, dst in orders.forks:  # a snapshot's rows copied into a hitting request's slot
            assert cached[src].shared and src not in self.by_slot and dst != src
            rid = self.by_slot[dst]
            assert self.first_computed[rid] == len(cached[src].tokens)
            self.forks.append((rid, len(cached[src].tokens)))
        self.first = {self.slot[r.req_id][0]: r for r in out.scheduled_new_reqs
                      if r.num_computed_tokens == 0}

    def pack(self, out, order):
        req_slot, L, cache_slot, _ = order
        if not self.pack_snapshots:
            return False
        assert req_slot in self.first, "a snapshot is ordered only from a first chunk"
        first = self.first[req_slot]
        assert L < out.num_scheduled_tokens[first.req_id]
        assert cache_slot not in self.by_slot, "a snapshot never lands on a request"
        self.orders.append((first.req_id, L, cache_slot))
        return True

    def report(self, sched, rid, slot, n, tag):
        if rid is not None:
            assert self.pages(n) <= self.H * self.mgr.held_blocks(rid), \
                "the ledger covers the rows"
        super().report(sched, rid, slot, n, tag)


def setup(dms_mod, model, blocks=400, stride=None):
    spec_mod, sched_mod = dms_mod
    vc = make_vllm_config(model, max_num_seqs=SEQS, max_num_batched_tokens=MAX_LEN,
                          max_model_len=MAX_LEN, enable_prefix_caching=True)
    spec = dms_spec(spec_mod, window=W, max_num_seqs=SEQS)
    sched = make_scheduler(sched_mod.DMSScheduler, vc, spec, LAYERS, blocks)
    assert sched.dms.cache is not None
    if stride:
        sched.dms.snapshot_stride = stride
    return sched, sched.dms, Worker(sched.dms)


def request(rid, tokens, max_tokens):
    return Request(request_id=rid, prompt_token_ids=list(tokens),
                   sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   pooling_params=None, block_hasher=get_request_block_hasher(16, sha256))


def run(sched, worker, steps=400, check=None):
    for _ in range(steps):
        if not sched.has_requests():
            return
        out = sched.schedule()
        sched.update_from_output(out, worker.step(sched, out))
        if check:
            check()
    raise AssertionError("not done")


def invariants(mgr):
    running = set(mgr._slot_of.values())
    cached = {e.slot for e in mgr.cache.entries()}
    assert len(running) == len(mgr._slot_of), "a slot is shared by running requests"
    assert not running & cached and not (running | cached) & set(mgr._free_slots)
    assert len(running | cached | set(mgr._free_slots)) == SEQS, "every slot accounted for"
    held = sum(len(h) for h in mgr._held.values())
    assert held == mgr.num_held
    assert held + mgr.cache.num_blocks + mgr.block_pool.get_num_free_blocks() == mgr.num_usable


def test_multi_turn_prompt_takes_the_finished_rows(dms, llama_dir):  # noqa: F811
    sched, mgr, worker = setup(dms, llama_dir)
    free0 = mgr.block_pool.get_num_free_blocks()
    a = request("a", range(100, 140), 6)
    sched.add_request(a)
    run(sched, worker, check=lambda: invariants(mgr))
    (entry,) = mgr.cache.entries()
    slot_a = entry.slot
    assert len(entry.tokens) == 45 and list(entry.tokens) == list(range(100, 140)) + [7] * 5
    assert slot_a not in worker.released, "the rows stay in the arena"
    turn2 = list(a.all_token_ids) + [9] * 10  # prompt + answer + a new user turn
    sched.add_request(request("b", turn2, 4))
    out = sched.schedule()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 45 and out.num_scheduled_tokens["b"] == len(turn2) - 45
    assert new.block_ids[0][0] % mgr.layout.num_slots == slot_a, "same slot: no copy"
    assert len(mgr.cache) == 0 and mgr.cache.num_blocks == 0
    stats = mgr.prefix_cache_stats
    assert stats.hits == 45 and stats.queries == len(turn2)
    sched.update_from_output(out, worker.step(sched, out))
    run(sched, worker, check=lambda: invariants(mgr))
    assert len(mgr.cache) == 1 and len(mgr.cache.entries()[0].tokens) == len(turn2) + 3
    assert mgr.reset_prefix_cache() and len(mgr.cache) == 0
    assert mgr.block_pool.get_num_free_blocks() == free0
    assert slot_a in mgr.link.release, "the next step tells the worker to free the rows"


def test_prompt_logprobs_request_does_not_read_the_cache(dms, llama_dir):  # noqa: F811
    """vLLM's rule: a request asking for prompt_logprobs computes its whole prompt (cached rows
    would give no logprobs); it still leaves an entry for later turns."""
    sched, mgr, worker = setup(dms, llama_dir)
    a = request("a", range(100, 140), 6)
    sched.add_request(a)
    run(sched, worker, check=lambda: invariants(mgr))
    turn2 = list(a.all_token_ids) + [9] * 10
    b = Request(request_id="b", prompt_token_ids=turn2, pooling_params=None,
                sampling_params=SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=1),
                block_hasher=get_request_block_hasher(16, sha256))
    assert b.skip_reading_prefix_cache
    sched.add_request(b)
    out = sched.schedule()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 0 and out.num_scheduled_tokens["b"] == len(turn2)
    assert len(mgr.cache) == 1, "the finished turn's entry stays for a later hit"
    sched.update_from_output(out, worker.step(sched, out))
    run(sched, worker, check=lambda: invariants(mgr))


def test_no_entry_from_aborted_or_preempted_and_no_hit_without_extension(dms, llama_dir):  # noqa: F811,E501
    sched, mgr, worker = setup(dms, llama_dir)
    sched.add_request(request("x", range(200, 230), 50))
    out = sched.schedule()
    sched.update_from_output(out, worker.step(sched, out))
    sched.finish_requests(["x"], RequestStatus.FINISHED_ABORTED)
    assert len(mgr.cache) == 0, "an aborted request leaves no entry"
    sched.add_request(request("y", range(300, 330), 3))
    run(sched, worker)
    (e,) = mgr.cache.entries()
    same = list(e.tokens)  # exactly the entry's tokens: nothing left to compute -> no hit
    sched.add_request(request("z", same, 2))
    out = sched.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert len(mgr.cache) == 1
    sched.update_from_output(out, worker.step(sched, out))
    run(sched, worker)


def test_entries_are_evicted_lru_for_blocks_and_slots(dms, llama_dir):  # noqa: F811
    sched, mgr, worker = setup(dms, llama_dir, blocks=160)
    free0 = mgr.block_pool.get_num_free_blocks()
    for i in range(3):  # three finished requests: three entries
        sched.add_request(request(f"f{i}", range(1000 * i, 1000 * i + 60), 2))
        run(sched, worker, check=lambda: invariants(mgr))
    assert [e.tokens[0] for e in mgr.cache.entries()] == [0, 1000, 2000]
    # four new long requests need every slot and most blocks: entries go, oldest first
    for i in range(4):
        sched.add_request(request(f"n{i}", range(5000 + 1000 * i, 5000 + 1000 * i + 300), 3))
    out = sched.schedule()
    sched.update_from_output(out, worker.step(sched, out))
    invariants(mgr)
    gone = [s for s in worker.released]
    assert len(mgr.cache) < 3 and len(gone) == 3 - len(mgr.cache)
    run(sched, worker, check=lambda: invariants(mgr))
    mgr.reset_prefix_cache()
    assert mgr.block_pool.get_num_free_blocks() == free0


def test_snapshot_of_a_shared_prefix_serves_a_different_prompt(dms, llama_dir):  # noqa: F811
    sched, mgr, worker = setup(dms, llama_dir, stride=16)
    free0 = mgr.block_pool.get_num_free_blocks()
    system = list(range(100, 140))  # 40 tokens every prompt shares
    sched.add_request(request("a", system + [1] * 5, 3))
    out = sched.schedule()
    assert sorted(L for _, L, _, _ in getattr(out, ORDERS_ATTR).snapshots) == [16, 32], "first-chunk snapshots"
    assert not any(e.ready for e in mgr.cache.entries()), "written by this very step"
    dense = [len(e.held) for e in mgr.cache.entries()]
    sched.update_from_output(out, worker.step(sched, out))
    invariants(mgr)
    sched.add_request(request("b", system + [2] * 7, 3))
    out = sched.schedule()  # the snapshots are ready now, and measured: they shrank
    assert [len(e.held) for e in mgr.cache.entries()] <= dense
    (new,) = out.scheduled_new_reqs
    snap32 = next(c for r, L, c in worker.orders if L == 32)
    assert new.num_computed_tokens == 32 and out.num_scheduled_tokens["b"] == 47 - 32
    assert new.block_ids[0][0] % mgr.layout.num_slots != snap32, "b has a slot of its own"
    assert getattr(out, ORDERS_ATTR).forks == [(snap32, new.block_ids[0][0] % mgr.layout.num_slots)]
    assert mgr.cache.oldest() is not None and all(
        e.pinned == (e.slot == snap32) for e in mgr.cache.entries()), "pinned while copied"
    sched.update_from_output(out, worker.step(sched, out))
    assert worker.forks == [("b", 32)]
    run(sched, worker, check=lambda: invariants(mgr))
    sched.add_request(request("c", system + [3] * 4, 3))  # the snapshot is still there
    out = sched.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 32
    sched.update_from_output(out, worker.step(sched, out))
    run(sched, worker, check=lambda: invariants(mgr))
    assert worker.forks == [("b", 32), ("c", 32)]
    mgr.reset_prefix_cache()
    assert mgr.block_pool.get_num_free_blocks() == free0 and mgr.num_held == 0


def test_a_snapshot_the_worker_never_packed_is_never_forked(dms, llama_dir):  # noqa: F811
    """Orders whose request was not in the worker's batch leave the cache slots unreported
    (DMSRuntime.order_snapshots): a prompt sharing the prefix must recompute it, not fork
    empty rows, and the unwritten snapshots still leave the cache cleanly."""
    sched, mgr, worker = setup(dms, llama_dir, stride=16)
    free0 = mgr.block_pool.get_num_free_blocks()
    system = list(range(100, 140))
    worker.pack_snapshots = False
    sched.add_request(request("a", system + [1] * 5, 3))
    out = sched.schedule()
    assert len(getattr(out, ORDERS_ATTR).snapshots) == 2, "orders were made"
    sched.update_from_output(out, worker.step(sched, out))
    sched.add_request(request("b", system + [2] * 7, 3))
    out = sched.schedule()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 0 and getattr(out, ORDERS_ATTR).forks == [], \
        "no hit on unwritten rows"
    assert all(e.measured is None for e in mgr.cache.entries() if e.shared)
    sched.update_from_output(out, worker.step(sched, out))
    run(sched, worker, check=lambda: invariants(mgr))
    assert worker.forks == []
    mgr.reset_prefix_cache()
    assert mgr.block_pool.get_num_free_blocks() == free0 and mgr.num_held == 0


def test_random_turns_keep_the_ledger_exact(dms, llama_dir):  # noqa: F811
    """2,000 events: new prompts, follow-up turns of finished ones, aborts; every step the slots
    and blocks add up; at the end everything returns to the pool."""
    sched, mgr, worker = setup(dms, llama_dir, blocks=220, stride=32)
    free0 = mgr.block_pool.get_num_free_blocks()
    rng = random.Random(5)
    done, live, reqs, k, hits = [], set(), {}, 0, 0
    for _ in range(2000):
        x = rng.random()
        if x < 0.15 and len(sched.waiting) < 6:
            base = list(rng.choice(done).all_token_ids) if done and rng.random() < 0.6 else \
                [rng.randrange(50, 30000) for _ in range(rng.randrange(5, 120))]
            extra = [rng.randrange(50, 30000) for _ in range(rng.randrange(1, 40))]
            if len(base) + len(extra) + 8 < MAX_LEN:
                r = request(f"r{k}", base + extra, rng.randrange(1, 8))
                k += 1
                sched.add_request(r)
                live.add(r.request_id)
                reqs[r.request_id] = r
        elif x < 0.2 and live:
            sched.finish_requests([rng.choice(sorted(live))], RequestStatus.FINISHED_ABORTED)
        if sched.has_requests():
            out = sched.schedule()
            hits += sum(r.num_computed_tokens > 0 for r in out.scheduled_new_reqs)
            sched.update_from_output(out, worker.step(sched, out))
            for rid in list(live):
                req = reqs[rid]
                if req.is_finished():
                    live.discard(rid)
                    if req.status == RequestStatus.FINISHED_LENGTH_CAPPED:
                        done.append(req)
            invariants(mgr)
    run(sched, worker, steps=2000, check=lambda: invariants(mgr))
    assert hits > 10, f"follow-up turns should hit ({hits})"
    mgr.reset_prefix_cache()
    assert mgr.block_pool.get_num_free_blocks() == free0 and mgr.num_held == 0


# ------------------------------------------------------------------ end to end on CPU kernels
class KernelWorker:
    """Scheduler outputs -> DMSMetadata -> the real impl over real arenas (Triton interpreter).
    q/k/v of a token are a function of (token id, position), as for a one-layer model, so a
    prompt's prefix state is the same whichever request computed it."""

    def __init__(self, lay, layers=2, H=2, G=2, D=32, vocab=64, max_len=128):
        from vllm_dms.worker.backend import DMSCompactAttentionImpl
        from vllm_dms.engine.config import DMSConfig
        from vllm_dms.worker.runtime import DMSRuntime
        self.lay, self.H, self.G, self.D = lay, H, G, D
        self.names = [f"l{i}" for i in range(layers)]
        self.kvs = [torch.zeros(lay.num_blocks, lay.page_bytes, dtype=torch.uint8)
                    for _ in self.names]
        cfg = DMSConfig(arch="llama", num_layers=layers, num_q_heads=H * G, num_kv_heads=H,
                        head_dim=D, window=lay.window, alpha_scale=100.0, alpha_offset=5.0,
                        decision_shift=1, target_cr=None, source="test")
        self.rt = DMSRuntime(cfg, lay, self.names, H * G, torch.device("cpu"))
        self.rt.init_arenas(self.kvs)
        self.link = WorkerLink()  # what the worker patch drives around each step
        self.link.runtime = self.rt
        self.impl = DMSCompactAttentionImpl(H * G, D, D ** -0.5, H)
        g = torch.Generator().manual_seed(3)
        self.q = torch.randn(vocab, max_len, H * G, D, generator=g).to(torch.bfloat16)
        self.q[..., ::G, D - 1] = torch.where(torch.rand(vocab, max_len, H, generator=g) < 0.6,
                                              0.3, -0.2).to(torch.bfloat16)
        self.k = torch.randn(vocab, max_len, H, D, generator=g).to(torch.bfloat16)
        self.vocab, self.slot, self.outs, self.rows_after_first = vocab, {}, {}, {}

    def step(self, sched, out):
        from vllm_dms.worker.backend import DMSMetadata
        self.link.receive(getattr(out, ORDERS_ATTR))  # releases, forks: before the forward
        orders = self.link.take_snapshots()
        S1, i32 = self.lay.num_slots, dict(dtype=torch.int32)
        for r in out.scheduled_new_reqs:
            bid = r.block_ids[0][0]
            self.slot[r.req_id] = bid % S1
            self.rt.slot_tag[bid % S1] = bid // S1
        for rid, n in out.num_scheduled_tokens.items():
            req = sched.requests[rid]
            done = req.num_computed_tokens - n
            slot = self.slot[rid]
            self.rt.slot_ntok[slot] = done + n
            s = torch.tensor([slot], **i32)
            ids = torch.tensor(req.all_token_ids[done:done + n]) % self.vocab
            pos = torch.arange(done, done + n)
            q, k = self.q[ids, pos].reshape(n, -1), self.k[ids, pos].reshape(n, -1)
            if n == 1 and done > 0:
                md = DMSMetadata(1, 1, 1, 0, 0, s, torch.tensor([done], **i32),
                                 torch.zeros(1, **i32), torch.zeros(0, dtype=torch.long), self.rt)
            else:
                cu = torch.tensor([0, n], **i32)
                md = DMSMetadata(n, 0, 0, 1, n, s, torch.zeros(0, **i32), cu,
                                 (cu[1:] - 1).long(), self.rt)
                if done:  # a continuation: the rows hold tokens [0, done)
                    md.prefill_n0 = torch.tensor([done], **i32)
                    md.prefill_first_slots, md.prefill_cont_slots = torch.zeros(1, **i32), s
                if orders:  # orders of other requests are skipped (not in this batch)
                    md.snap_starts, md.snap_len, md.snap_dst = self.rt.order_snapshots(
                        orders, s, cu)
            outs = []
            for name, kv in zip(self.names, self.kvs):
                o = torch.empty(n, q.shape[1], dtype=torch.bfloat16)
                self.impl.forward(types.SimpleNamespace(layer_name=name), q, k, k, kv, md, o)
                outs.append(o.float())
            self.outs.setdefault(rid, []).append((done, torch.stack(outs)))
            self.rows_after_first.setdefault(rid, self.rows(slot))
        assert int(self.rt.overflow[0]) == 0
        self.link.after_forward()
        mro = runner_output(sched, out, token=7)
        setattr(mro, FEEDBACK_ATTR, self.link.report())
        return mro

    def rows(self, slot):
        from vllm_dms.worker.kernels.arena_ops import arena_read_row
        return [[(arena_read_row(kv, self.lay, slot, h)["pos"].sort().values,
                  arena_read_row(kv, self.lay, slot, h)["flag"][
                      arena_read_row(kv, self.lay, slot, h)["pos"].argsort()])
                 for h in range(self.lay.num_kv_heads)] for kv in self.kvs]


def kernel_run(dms_mod, model, caching, prompts):
    """Each prompt is a function of the finished requests so far; returns the last request's
    rows, its per-step outputs and how many tokens it had computed when first scheduled."""
    spec_mod, sched_mod = dms_mod
    vc = make_vllm_config(model, max_num_seqs=4, max_num_batched_tokens=256, max_model_len=128,
                          enable_prefix_caching=caching)
    vc.cache_config.cache_dtype = "dms_fp8"
    spec = spec_mod.DMSCompactSpec(block_size=16, num_kv_heads=2, head_size=32,
                                   dtype=torch.uint8, dms_window=4, dms_max_num_seqs=4)
    sched = make_scheduler(sched_mod.DMSScheduler, vc, spec, 2, 60)
    if caching:
        sched.dms.snapshot_stride = 16
    worker = KernelWorker(sched.dms.layout)
    done, first = [], {}
    for i, make in enumerate(prompts):
        r = request(f"r{i}", make(done), 4)
        sched.add_request(r)
        while sched.has_requests():
            out = sched.schedule()
            for n in out.scheduled_new_reqs:
                first[n.req_id] = n.num_computed_tokens
            sched.update_from_output(out, worker.step(sched, out))
        done.append(r)
    last = f"r{len(prompts) - 1}"
    return worker.rows_after_first[last], worker.outs[last], first[last]


def close_outputs(a, b):
    """Per step of the last request: with reuse its prefix keys come from the FP8 arena, in one
    shot they are the chunk's own bf16 keys, hence a tolerance; later steps read FP8 in both."""
    tail = {done: o for done, o in b}
    for done, o in a:
        if done in tail:  # a decode step of both runs
            assert (o - tail[done]).abs().max() < 3e-2, done
    la, lb = a[0][1], b[0][1][:, -a[0][1].shape[1]:]  # the continuation's query rows
    assert ((la - lb).norm() / lb.norm()) < 5e-2 and (la - lb).abs().max() < 0.15  # FP8 vs bf16


def same_rows(x, y):
    for lx, ly in zip(x, y):
        for (px, fx), (py, fy) in zip(lx, ly):
            assert torch.equal(px, py) and torch.equal(fx, fy)


def test_follow_up_turn_through_the_kernels_matches_recompute(dms, llama_dir):  # noqa: F811
    """Turn 2 takes turn 1's rows (prefix reuse) or recomputes them: same live rows and flags
    after every token, outputs within the FP8 tolerance."""
    prompts = [lambda done: list(range(3, 43)),
               lambda done: list(done[0].all_token_ids) + [11, 12, 13, 14, 15]]
    rows_on, outs_on, first_on = kernel_run(dms, llama_dir, True, prompts)
    rows_off, outs_off, first_off = kernel_run(dms, llama_dir, False, prompts)
    assert first_on == 40 + 4 - 1 and first_off == 0, "turn 2 starts from turn 1's rows"
    same_rows(rows_on, rows_off)  # live sets and flags after turn 2's prompt, exactly
    close_outputs(outs_on, outs_off)


def test_shared_prefix_snapshot_through_the_kernels_matches_recompute(dms, llama_dir):  # noqa: F811,E501
    """A different prompt with the same 40-token prefix starts from a snapshot (32 tokens)."""
    prompts = [lambda done: list(range(3, 43)) + [50, 51],
               lambda done: list(range(3, 43)) + [60, 61, 62, 63]]
    rows_on, outs_on, first_on = kernel_run(dms, llama_dir, True, prompts)
    rows_off, outs_off, first_off = kernel_run(dms, llama_dir, False, prompts)
    assert first_on == 32 and first_off == 0
    same_rows(rows_on, rows_off)
    close_outputs(outs_on, outs_off)
