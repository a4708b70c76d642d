"""One engine, any executor: ``vllm.LLM(..., kv_cache_dtype="dms_fp8")`` on the CPU (``cpu_engine``)
with the worker in the engine's process (uni), in a process of its own
(``distributed_executor_backend="mp"``), at ``tensor_parallel_size=2`` (one worker process per
rank, each with the arena of its own KV head), and two engines alive in one process.

Each run drives vLLM's engine step by step over two rounds of two prompts (the second round
starts after the first finished, so it reuses the first round's slots) and checks what only the
step messages can make true (``vllm_dms.engine.channel``):

* releases reach the worker: after one more (empty) engine step every arena is idle again (free
  stacks full, no live row), whichever process holds it;
* measurements reach the scheduler: the long prompt's reservation ends below the dense bound;
* the greedy tokens and the per-(layer, slot, KV head) live counts the last round left in the
  arenas are the same with every executor, and at TP=2 (rank r holds KV head r) in every layer
  when the decisions are farther from their threshold than TP's all-reduce rounding moves them
  (a checkpoint built so, whose margin the test measures); on the plain random model, whose
  decisions sit closer to it than that, layer 1 may differ by one key per head.

The engine core runs in the test's interpreter (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the scheduler
can be inspected; the workers' arenas are read through ``llm.collective_rpc``. Worker processes
are spawned and apply ``cpu_engine`` through ``tests/cpu_site`` (VLLM_DMS_CPU_ENGINE=1).
"""
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "reliability"))
from gpu_util import run_py  # noqa: E402
from sim_engine import write_checkpoint  # noqa: E402
from test_cpu_llm import random_prompts  # noqa: E402

ENV = {"PYTHONPATH": f"{REPO}:{TESTS / 'cpu_site'}:{TESTS}", "VLLM_DMS_CPU_ENGINE": "1",
       "VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
MARGIN = 10.0  # smallest |decision logit| the exact TP test needs (and 10x the bf16 drift)
# smallest top-1 minus top-2 logprob of a greedy step it needs: bf16 logits near 10 lie 1/16
# apart, and TP=2 moved a top-2 logprob by up to 0.06 (one such step) on this checkpoint
LEAD = 0.15
# block 16: fine enough that a 100-token prompt's measured rows take fewer blocks than its dense
# bound; no prefix caching: finished rows are released (not kept as entries), which is checked
KW = dict(max_model_len=640, kv_cache_memory_bytes=1 << 24, block_size=16,
          enable_prefix_caching=False)
ENGINE = """
sys.path.insert(0, A["tests"])
import cpu_engine
cpu_engine.apply()
from vllm import LLM, SamplingParams


def arena(worker, layout):  # runs in each worker: its arena, per layer
    from vllm_dms.worker.kernels.arena_ops import arena_state
    ctx = worker.vllm_config.compilation_config.static_forward_context
    names = sorted(n for n, x in ctx.items() if getattr(x, "kv_cache_dtype", "") == "dms_fp8")
    st = [arena_state(ctx[n].kv_cache.view(-1), layout) for n in names]
    return dict(rows=[s.row_len.tolist() for s in st], free=[int(s.free_top[0]) for s in st])


def run(llm, rounds, n):
    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    mgr = sched.dms
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False,
                        logprobs=2)
    res = dict(tokens={}, logprobs={}, held=[], dense=[])
    for r, prompts in enumerate(rounds):
        for i, p in enumerate(prompts):
            eng.add_request(f"{r}.{i}", {"prompt_token_ids": p}, sp)
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    rid = o.request_id.split("-")[0]  # ours, without vLLM's suffix if any
                    res["tokens"][rid] = list(o.outputs[0].token_ids)
                    res["logprobs"][rid] = [sorted((x.logprob for x in d.values()),
                                                   reverse=True)[:2]
                                            for d in o.outputs[0].logprobs]
            for req in sched.running:  # the round's long prompt (vLLM suffixes request ids)
                if req.num_prompt_tokens == max(map(len, prompts)):
                    res["held"].append(mgr.held_blocks(req.request_id))
                    res["dense"].append(mgr.layout.reservation_blocks(req.num_computed_tokens))
    res["last_round"] = llm.collective_rpc(arena, args=(mgr.layout,))  # rows still in place
    eng.step()  # an empty step: it carries the last round's releases
    res["idle"] = llm.collective_rpc(arena, args=(mgr.layout,))
    res["capacity"] = mgr.layout.num_data_subpages
    return res


llms = [LLM(A["model"], kv_cache_dtype="dms_fp8", **cpu_engine.ENGINE_KW, **A["kw"], **kw)
        for kw in A["engines"]]
out["runs"] = [run(llm, A["rounds"], A["n"]) for llm in llms for _ in range(A["repeat"])]
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cpu_executors"))


@pytest.fixture(scope="module")
def clear_ckpt(tmp_path_factory):
    """Every decision logit far from the threshold (``sim_engine.clear_decisions``)."""
    return write_checkpoint(tmp_path_factory.mktemp("cpu_executors_clear"), clear=True)


@pytest.fixture(scope="module")
def rounds():  # seed 1003 for the 9-token (W + 1) prompt: every greedy step clears LEAD
    return [random_prompts(1, 40, seed=40) + random_prompts(1, 150, seed=150),
            random_prompts(1, 9, seed=1003) + random_prompts(1, 100, seed=100)]


def engines(ckpt, rounds, engines, repeat=1, n=6):
    import cpu_engine
    args = dict(model=ckpt, rounds=rounds, n=n, tests=str(TESTS), kw=KW, engines=engines,
                repeat=repeat)
    return run_py(ENGINE, args, env={**cpu_engine.ENV, **ENV}, timeout=1500)["runs"]


def check_run(run):
    """Releases reached every worker, measurements reached the scheduler."""
    for rank in run["idle"]:
        assert rank["free"] == [run["capacity"]] * len(rank["free"]), "sub-pages not released"
        assert not any(map(any, (row for layer in rank["rows"] for row in layer)))
    held, dense = run["held"], run["dense"]
    assert held and held[-1] < dense[-1], f"reservation never shrank: {held} vs dense {dense}"


def live_by_head(run):
    """[layer] -> {slot: [live count of each KV head]} of the slots the last round left rows
    in, the ranks' heads side by side (engines may have different slot counts)."""
    ranks = [r["rows"] for r in run["last_round"]]
    by_layer = []
    for li in range(len(ranks[0])):
        heads = {s: sum((rank[li][s] for rank in ranks), []) for s in range(len(ranks[0][li]))}
        by_layer.append({s: h for s, h in heads.items() if any(h)})
    assert all(len(layer) == 2 for layer in by_layer), "the last round's two rows"
    return by_layer


def pairs(rounds, tokens):
    """[(prompt, its greedy output)] of a run's `tokens` ({"round.index": output})."""
    return [(p, tokens[f"{r}.{i}"]) for r, ps in enumerate(rounds) for i, p in enumerate(ps)]


def leads(run):
    """The top-1 minus top-2 logprob of each greedy step of a run, and those top-2 values."""
    top = [step for steps in run["logprobs"].values() for step in steps]
    return [a - b for a, b in top], top


def decision_margin(model_dir, prompts_and_outputs):
    """(margin, drift) over every prompt + its output, every layer, token and KV head: margin is
    the smallest |decision logit| of the exact reference (fp32; K/V on the FP8 grid, as the
    engine), drift the largest move of a decision logit when the reference rounds every
    activation to bf16 instead (the size of rounding noise on this model)."""
    from transformers import LlamaForCausalLM
    from vllm_dms.engine.config import DMSConfig
    from vllm_dms.tools.reference import reference_forward
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    dms = DMSConfig.from_checkpoint(model_dir)
    margin, drift = float("inf"), 0.0
    for p, out in prompts_and_outputs:
        seq = torch.tensor(p + out[:-1])  # the last output token is never fed to the model
        exact, bf16 = (reference_forward(model, dms, seq, kv_fp8=True, dtype=dt)
                       for dt in (torch.float32, torch.bfloat16))
        margin = min(margin, float(exact.lane_logits.abs().min()))
        drift = max(drift, float((exact.lane_logits - bf16.lane_logits).abs().max()))
    return margin, drift


@pytest.fixture(scope="module")
def uni(ckpt, rounds):
    """The reference: one engine, its worker in the engine core (the uni executor)."""
    (run,) = engines(ckpt, rounds, [dict(max_num_seqs=4)])
    return run


def test_uni_executor(uni):
    check_run(uni)  # also: releases apply on the empty step that carries them, not a step later
    assert sum(map(len, uni["tokens"].values())) == 4 * 6


def test_two_engines_in_one_process(ckpt, rounds, uni):
    """Both alive (other max_num_seqs), each run twice: A's runs, then B's, A still alive."""
    runs = engines(ckpt, rounds, [dict(max_num_seqs=4), dict(max_num_seqs=3)], repeat=2)
    for run in runs:
        check_run(run)
        assert run["tokens"] == uni["tokens"]
        assert live_by_head(run) == live_by_head(uni)


def test_mp_executor_releases_reach_the_worker(ckpt, rounds, uni):
    (run,) = engines(ckpt, rounds, [dict(max_num_seqs=4, distributed_executor_backend="mp")])
    check_run(run)
    assert run["tokens"] == uni["tokens"]
    assert live_by_head(run) == live_by_head(uni)


def test_tp2_equals_tp1_in_every_layer_when_decisions_clear_the_rounding(clear_ckpt, rounds):
    """TP=2 against TP=1 (both in one interpreter) on a checkpoint whose decision logits are all
    at least MARGIN from the threshold and 10 times their bf16 drift (measured with the exact
    reference on these prompts and TP=1's tokens), and whose greedy steps at TP=1 lead by at
    least LEAD: TP's all-reduce can then flip neither a decision nor a token, so greedy tokens
    and every (layer, slot, KV head) live count must be equal. 5 tokens: the 100-token prompt's
    6th step is a near-tie (its reference lead is 0.003)."""
    n = 5
    tp1, tp2 = engines(clear_ckpt, rounds, [dict(max_num_seqs=4),
                                            dict(max_num_seqs=4, tensor_parallel_size=2)], n=n)
    margin, drift = decision_margin(clear_ckpt, pairs(rounds, tp1["tokens"]))
    (lead1, top1), (_, top2) = leads(tp1), leads(tp2)
    moved = max(abs(a - b) for x, y in zip(top1, top2) for a, b in zip(x, y))
    print(f"clear checkpoint: decision margin {margin:.3f}, bf16 drift {drift:.3f}, smallest "
          f"TP=1 lead {min(lead1):.3f}, largest TP=2 top-2 logprob move {moved:.4f}")
    assert margin >= MARGIN and margin >= 10 * drift, (margin, drift)
    assert min(lead1) >= LEAD, lead1
    assert len(tp1["idle"]) == 1 and len(tp2["idle"]) == 2, "one arena per rank"
    check_run(tp1)
    check_run(tp2)
    assert tp2["tokens"] == tp1["tokens"] and sum(map(len, tp1["tokens"].values())) == 4 * n
    one, two = live_by_head(tp1), live_by_head(tp2)
    assert two == one, (one, two)
    for layer in one:  # eviction is real in every layer and head: the 100-token prompt's row
        longest = max(layer.values(), key=sum)
        assert all(0 < k < 100 for k in longest), layer


def test_tp2_on_the_plain_model_is_within_one_key(ckpt, rounds, uni):
    """The plain random model's decisions sit closer to the threshold than bf16 rounding moves
    them (measured: margin below the drift), so the all-reduce, which rounds the hidden state
    differently from one GEMM, may flip one: layer 0 (same input bits on every rank) is exact,
    later layers within one key per head (measured once: slot 2, both heads +1 in layer 1)."""
    margin, drift = decision_margin(ckpt, pairs(rounds, uni["tokens"]))
    print(f"plain checkpoint: decision margin {margin:.3f}, bf16 drift {drift:.3f}")
    assert margin < drift, (margin, drift)
    (run,) = engines(ckpt, rounds, [dict(max_num_seqs=4, tensor_parallel_size=2)])
    assert len(run["idle"]) == 2, "one arena per rank"
    check_run(run)
    assert run["tokens"] == uni["tokens"]
    per_rank = [sum(map(sum, r["rows"][0])) for r in run["last_round"]]
    assert all(per_rank), f"each rank holds live keys of its own head: {per_rank}"
    tp1, tp2 = live_by_head(uni), live_by_head(run)
    print("plain checkpoint, TP=2 minus TP=1 live counts per layer, slot, head:",
          [{s: [b - a for a, b in zip(h, two[s])] for s, h in one.items()}
           for one, two in zip(tp1, tp2)])
    assert tp2[0] == tp1[0]
    for one, two in zip(tp1[1:], tp2[1:]):
        assert one.keys() == two.keys()
        for slot, heads in one.items():
            assert max(abs(a - b) for a, b in zip(heads, two[slot])) <= 1, (slot, heads, two)
