"""GPU reliability tests through the offline ``vllm.LLM`` API (C.4 rows 4, 5, 14, 19, 20, 23, 24).

Need one CUDA GPU (H200-class), vLLM 0.26.0 and this plugin installed; skipped without CUDA.
Engines run in their own interpreters (gpu_util.Engine / run_py); the eager DMS and plain engines
are module-scoped and serve several tests; engines a test compares start concurrently. Greedy
decoding, ignore_eos; vLLM's defaults otherwise (chunked prefill and prefix caching on).
"""
import pytest

from gpu_util import (UTIL, Engine, assert_near_greedy, build_checkpoints, kv_bytes_for_blocks,
                      prompts, run_py, started)

pytestmark = pytest.mark.gpu
COMMON = dict(max_model_len=1024, max_num_seqs=8, seed=0, gpu_memory_utilization=UTIL,
              kv_cache_memory_bytes=1 << 30)
EAGER = dict(COMMON, enforce_eager=True)
STOCK = {"VLLM_PLUGINS": "none_but_stock"}
SHARED = pytest.mark.xdist_group("dms-eager")  # --dist loadgroup: one dms_eager per run
# Paths that read K/V differently (a recompute or a continuation reads FP8 rows that a fresh
# prefill reads in bf16) may flip this random-weight model's near-ties: their tokens must be the
# other path's greedy choice within TOL nats (the CPU tier measured 0.15-0.32 for such gaps).
TOL = 0.5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_checkpoints(str(tmp_path_factory.mktemp("gpu_ckpt")))


@pytest.fixture(scope="module")
def dms_eager(ckpts):
    e = started(Engine(ckpts[0], kv_cache_dtype="dms_fp8", **EAGER))[0]
    yield e
    e.close()


@pytest.fixture(scope="module")
def plain_eager(ckpts):
    e = started(Engine(ckpts[1], kv_cache_dtype="auto", **EAGER))[0]
    yield e
    e.close()


def closing(*engines):
    for e in engines:
        e.close()


@pytest.mark.parametrize("dtype", ["auto", "fp8"])
def test_r4_non_dms_model_identical_to_stock(ckpts, plain_eager, dtype):
    ps = prompts(4, 64)
    ours = plain_eager if dtype == "auto" else Engine(ckpts[1], kv_cache_dtype=dtype, **EAGER)
    stock = Engine(ckpts[1], env=STOCK, kv_cache_dtype=dtype, **EAGER)
    started(*{ours, stock})
    try:
        assert ours.info == stock.info  # KV block count and attention backend
        assert ours.tokens(ps, 32) == stock.tokens(ps, 32), dtype
    finally:
        closing(stock, *([] if ours is plain_eager else [ours]))


@SHARED
def test_r5_engines_in_one_process_dense_dms_dense_dms(ckpts, dms_eager, plain_eager):
    dms, plain = ckpts
    ps = prompts(4, 300, seed=5)  # past the window: eviction happens in the DMS engines
    res = run_py("""
        from vllm import LLM
        from vllm.distributed import cleanup_dist_env_and_memory
        import gc
        seq = []
        for model, dtype, seqs in A["order"]:
            llm = LLM(model, kv_cache_dtype=dtype, **{**A["kw"], "max_num_seqs": seqs})
            seq.append(greedy(llm, A["prompts"], 48))
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
        out["seq"] = seq
    """, dict(order=[[plain, "auto", 8], [dms, "dms_fp8", 8], [plain, "auto", 8],
                     [dms, "dms_fp8", 4]], kw=EAGER, prompts=ps),
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})["seq"]
    # In one process the runs batch alike: exact. Nothing the DMS engine leaves behind
    # changes the dense engine after it; max_num_seqs 4 gets an arena of its own.
    assert res[0] == res[2], "a dense engine after a DMS engine in the same process differs"
    assert res[1] == res[3]
    # Engines in other processes receive the prompts over time (their first step may batch
    # fewer of them: other GEMM shapes; H100 2026-12-07: differed from index 23 of 48 on):
    # each token the other engine's greedy choice within TOL.
    assert_near_greedy(plain_eager, ps, res[0], TOL)
    assert_near_greedy(dms_eager, ps, res[1], TOL)


def test_r14_forced_preemption_counted_and_near_greedy(ckpts):
    dms, _ = ckpts
    ps = prompts(8, 128, seed=14)
    kw = dict(EAGER, kv_cache_dtype="dms_fp8", disable_log_stats=False)
    # One unmeasured max_model_len request plus the state block: 8 requests each need at
    # least ceil((W+1)/64) + 1 blocks once decoding, so the pool must preempt.
    tiny, roomy = started(
        Engine(dms, **{**kw, "kv_cache_memory_bytes": kv_bytes_for_blocks(dms, 1024 // 64 + 1)}),
        Engine(dms, **{**kw, "kv_cache_memory_bytes": kv_bytes_for_blocks(dms, 400)}))
    try:
        t = tiny.greedy(ps, 384, metrics=["vllm:num_preemptions"])
        r = roomy.greedy(ps, 384, metrics=["vllm:num_preemptions"])
        assert t["vllm:num_preemptions"] > 0 and r["vllm:num_preemptions"] == 0
        # H100, 01bba05: one token of 3072 was 0.688 off, every other request's worst <= 0.28;
        # likely (not measured) a decision within rounding of its threshold that the decode /
        # recompute kernels and the scoring prefill settle differently
        assert_near_greedy(roomy, ps, t["tokens"], TOL, flips_per_1000=1)
    finally:
        closing(tiny, roomy)


@SHARED
def test_r19_cuda_graphs_equal_eager(ckpts, dms_eager):
    graph = started(Engine(ckpts[0], kv_cache_dtype="dms_fp8", **COMMON, enforce_eager=False,
                           compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}))[0]
    try:
        for batch in (1, 3, 8):  # padded to capture sizes 1, 4, 8
            ps = prompts(batch, 200, seed=19 + batch)
            assert graph.tokens(ps, 64) == dms_eager.tokens(ps, 64), batch
    finally:
        graph.close()


@SHARED
def test_r20_batch_invariance(dms_eager):
    """First 16 tokens identical; after that both runs are greedy within TOL under one scoring.
    The batch shape changes the GEMMs and the decode split count (fp32 reduction order), so a
    near-tie of a random-weight model may flip late in a sequence (H100, 2026-12-07: from token
    17 on); positions after a flip are no longer comparable one by one."""
    ps = prompts(8, 250, seed=20)
    batch = dms_eager.tokens(ps, 64)
    alone = dms_eager.tokens(ps[:1], 64)
    assert alone[0][:16] == batch[0][:16]
    assert_near_greedy(dms_eager, ps[:1], alone, TOL)
    assert_near_greedy(dms_eager, ps[:1], batch[:1], TOL)


@SHARED
def test_r23_multi_turn_resend_matches_fresh_prompt(ckpts, dms_eager):
    turn1 = prompts(1, 150, seed=23)[0]
    res = run_py("""
        from vllm import LLM
        llm = LLM(A["model"], kv_cache_dtype="dms_fp8", **A["kw"])
        a1 = greedy(llm, [A["turn1"]], 40)[0]
        turn2 = A["turn1"] + a1 + A["more"]  # the client re-sends turn 1 and its answer
        out["a2"] = greedy(llm, [turn2], 40)[0]
        out["turn2"] = turn2
        out["hits"] = metric(llm, "vllm:prefix_cache_hits")
    """, dict(model=ckpts[0], turn1=turn1, more=prompts(1, 30, seed=24)[0],
              kw=dict(EAGER, disable_log_stats=False)))
    # prefix caching (on by default) takes turn 1's rows: turn 2 reads turn 1 from the FP8
    # arena where a fresh prefill reads it in bf16
    assert res["hits"] >= 150, res["hits"]
    assert_near_greedy(dms_eager, [res["turn2"]], [res["a2"]], TOL)


def test_r24_kernel_overflow_fails_the_engine_no_hang(ckpts):
    res = run_py("""
        from vllm import LLM
        llm = LLM(A["model"], kv_cache_dtype="dms_fp8", **A["kw"])
        greedy(llm, A["prompts"], 8)
        from vllm_dms.worker.runtime import inprocess_engine
        import torch
        with torch.inference_mode():  # the runtime's buffers are inference tensors
            inprocess_engine(llm)[1].overflow_host[0] = 1  # as if a kernel hit its capacity check
        try:
            greedy(llm, A["prompts"], 8)
            out["error"] = None
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
    """, dict(model=ckpts[0], prompts=prompts(2, 64), kw=EAGER),
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, timeout=600)
    assert res["error"] and "ledger violated" in res["error"], res
