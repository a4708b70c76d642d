"""GPU: chunked prefill and prefix caching with dms_fp8 through ``vllm.LLM`` (issue 14).

The CPU twin is tests/test_sim_engine.py (exact, with FP8-grid K/V). Here the random-weight
checkpoint's K/V are real bf16 values: a continuation chunk reads earlier chunks from the FP8 arena
where a one-shot prefill reads them in bf16, so a near-tie may flip: every token must be the
other run's greedy choice within TOL nats (gpu_util.assert_near_greedy). The engines a test
compares start at once.
"""
import pytest

from gpu_util import (UTIL, Engine, assert_near_greedy, build_checkpoints, kv_bytes_for_blocks,
                      prompts, started)

pytestmark = pytest.mark.gpu
KW = dict(max_model_len=8192, max_num_seqs=8, seed=0, gpu_memory_utilization=UTIL,
          kv_cache_dtype="dms_fp8", disable_log_stats=False,
          compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})
TOL = 0.5  # as test_gpu_offline.TOL


@pytest.fixture(scope="module")
def dms_ckpt(tmp_path_factory):
    return build_checkpoints(str(tmp_path_factory.mktemp("gpu_ckpt")))[0]


def engine(model, **kw):
    # room for every prompt below at the dense bound at once (the 8000-token one is 125 blocks)
    return Engine(model, **{**KW, "kv_cache_memory_bytes": kv_bytes_for_blocks(model, 512), **kw})


def test_chunked_prefill_matches_one_shot(dms_ckpt):
    ps = [p for n in (1, 7, 64, 65, 600, 3000, 8000) for p in prompts(1, n, seed=n)]
    chunks = (8, 64, 65, 512)  # 7 prompts < max_num_seqs; W = 64
    one_shot, *chunked = started(
        engine(dms_ckpt, enable_chunked_prefill=False),
        *(engine(dms_ckpt, enable_chunked_prefill=True, max_num_batched_tokens=c) for c in chunks))
    try:
        for c, e in zip(chunks, chunked):
            assert_near_greedy(one_shot, ps, e.tokens(ps, 64), TOL)
    finally:
        for e in (one_shot, *chunked):
            e.close()


def conversation(e, turn1, follow_ups, n=32, state=False):
    """A chat: each turn re-sends the previous turns and answers plus a new question.
    Returns (prompts, answers) of the follow-up turns, the prompt tokens each took from the
    prefix cache and, with state, the engine's prefix entries before each turn (dms_state)."""
    asked, answers, hits, states, seq = [], [], [], [], list(turn1)
    for q in follow_ups:
        seq = seq + q
        if state:
            states.append(dict(prompt=len(seq), **e.dms_state()))
        (a,), (hit,) = e.cached([seq], n)
        hits.append(hit)
        asked.append(seq)
        answers.append(a)
        seq = seq + a
    return asked, answers, hits, states


def test_shared_4k_prefix_and_follow_up_turns_same_tokens_with_and_without_caching(dms_ckpt):
    system = prompts(1, 4096, seed=40)[0]
    qs = [system + q for q in prompts(8, 40, seed=41)]
    turns = prompts(4, 24, seed=42)
    # caching on in-process, so that each turn's prefix entries can be read (dms_state)
    off, on = started(engine(dms_ckpt, enable_prefix_caching=False),
                      engine(dms_ckpt, enable_prefix_caching=True,
                             env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}))
    try:
        res = {}
        for name, e in (("off", off), ("on", on)):
            first, hits_first = e.cached(qs[:1], 64)  # its prefill makes the snapshots
            rest, hits_q = e.cached(qs[1:], 64)  # the 7 others fork the 4096-token snapshot
            *chat, turn_hits, states = conversation(e, qs[0] + first[0], turns, state=e is on)
            res[name] = dict(tokens=first + rest, chat=chat, hits_q=hits_first + hits_q,
                             turn_hits=turn_hits, states=states)
        # caching on vs off: each run's tokens near-greedy under the other engine
        assert_near_greedy(off, qs, res["on"]["tokens"], TOL)
        assert_near_greedy(off, *res["on"]["chat"], TOL)
    finally:
        off.close()
        on.close()
    assert res["off"]["hits_q"] == [0] * 8 and res["off"]["turn_hits"] == [0] * 4
    assert res["on"]["hits_q"] == [0] + [4096] * 7, res["on"]["hits_q"]
    # the first follow-up forks the 4096 snapshot (or takes question 0's row if it is still
    # cached); each later one takes the previous turn's row: its whole prompt and answer
    hits = res["on"]["turn_hits"]
    assert hits[0] >= 4096 and all(h >= 4096 + 40 + 64 for h in hits[1:]), \
        (hits, res["on"]["states"])
