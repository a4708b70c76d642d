"""`vllm serve MODEL --kv-cache-dtype dms_fp8 --tensor-parallel-size 2` on the CPU, over HTTP.

As in test_cpu_server.py, the API server, its engine core and here also the two worker processes
(rank r holds KV head r and its arena) apply tests/cpu_engine.py at start (tests/cpu_site on
PYTHONPATH, VLLM_DMS_CPU_ENGINE=1): stock vLLM's server, engine core, multiprocess executor and
CPU workers (gloo all-reduce) serve the plugin. The checkpoint is test_cpu_executors.py's:
the tiny random Llama (256-token vocabulary, so no tokenizer: --skip-tokenizer-init, token ids
in and out) with every decision far from its threshold (``sim_engine.clear_decisions``). The
test measures both preconditions on the served tokens, the decision margin with the exact
reference and each greedy step's lead at TP=1, so that TP's all-reduce rounding can flip
neither, and the tokens must be exactly TP=1's.

Greedy completions, sent one at a time, are compared with ``vllm.LLM`` at TP=1 in a fresh
interpreter with the same settings, also one request at a time (same batches). Every DMS gauge
reading taken while they run must be one the TP=1 scheduler published; afterwards all idle.
"""
import json
import sys
import threading
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "reliability"))
import test_gpu_server as G  # noqa: E402
from gpu_util import Server, run_py  # noqa: E402
from sim_engine import write_checkpoint  # noqa: E402
from test_cpu_executors import LEAD, MARGIN, decision_margin  # noqa: E402
from test_cpu_llm import random_prompts  # noqa: E402
from test_cpu_server import ENV  # noqa: E402

ENV = {**ENV, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
N = 5  # greedy tokens per completion
# the same engine settings on both sides (vLLM's server and offline defaults differ, so each
# is named): no prefix caching (finished rows are released, not kept), one budget for all
KW = dict(max_model_len=640, max_num_seqs=4, max_num_batched_tokens=640,
          kv_cache_memory_bytes=1 << 24, enable_prefix_caching=False)
TP1 = """
sys.path.insert(0, A["tests"])
import cpu_engine
cpu_engine.apply()
from vllm import LLM, SamplingParams
llm = LLM(A["model"], kv_cache_dtype="dms_fp8", **cpu_engine.ENGINE_KW, **A["kw"])
eng = llm.llm_engine
mgr = eng.engine_core.engine_core.scheduler.dms
sp = SamplingParams(temperature=0.0, max_tokens=A["n"], ignore_eos=True, detokenize=False,
                    logprobs=2)
out["tokens"], out["gauges"], out["leads"] = [], [], []
for i, p in enumerate(A["prompts"]):  # one request at a time, as the HTTP client sends them
    eng.add_request(str(i), {"prompt_token_ids": p}, sp)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out["tokens"].append(list(o.outputs[0].token_ids))
                for d in o.outputs[0].logprobs:  # top-1 minus top-2 logprob of each step
                    top = sorted((x.logprob for x in d.values()), reverse=True)
                    out["leads"].append(top[0] - top[1])
        g = mgr.gauges()  # what make_stats publishes for that step
        out["gauges"].append([g["live_kv_tokens"], g["evicted_kv_tokens"]])
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cpu_server_tp"), clear=True)


@pytest.fixture(scope="module")
def prompts():
    # the 9-token prompt (W + 1) of seed 1003: seed 9's 3rd greedy step is a near-tie at TP=1
    return [random_prompts(1, n, seed=1003 if n == 9 else n)[0] for n in (40, 9, 100, 120)]


@pytest.fixture(scope="module")
def tp1(ckpt, prompts):
    import cpu_engine
    args = dict(model=ckpt, prompts=prompts, n=N, tests=str(TESTS), kw=KW)
    return run_py(TP1, args, env={**cpu_engine.ENV, **ENV}, timeout=900)


@pytest.fixture(scope="module")
def server(ckpt):
    flags = ["--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
             "--kv-cache-memory-bytes"]
    values = [KW["max_model_len"], KW["max_num_seqs"], KW["max_num_batched_tokens"],
              KW["kv_cache_memory_bytes"]]
    args = [x for f, v in zip(flags, values) for x in (f, str(v))]
    with Server(ckpt, "--kv-cache-dtype", "dms_fp8", "--tensor-parallel-size", "2",
                "--no-enable-prefix-caching", "--skip-tokenizer-init", "--enforce-eager",
                "--dtype", "bfloat16",
                "--compilation-config", json.dumps({"custom_ops": ["none"]}), *args,
                env=ENV) as s:
        yield s


def dms_gauges(m):
    return {k: v for k, v in m.items() if k.startswith("vllm:dms_")}


def test_tp2_server_gives_tp1_tokens_and_gauges_return_to_idle(server, tp1, ckpt, prompts):
    """Tokens equal TP=1's; every DMS gauge reading taken while the requests ran is a (live,
    evicted) pair the TP=1 engine's scheduler published after one of its steps (so both ranks'
    heads are counted, once); idle before and after the last requests."""
    got = [G.tokens(server, prompts[0], N)]  # the first request publishes the DMS gauges
    idle0 = dms_gauges(G.idle(server))
    seen = []

    def rest():
        got.extend(G.tokens(server, p, N) for p in prompts[1:])

    t = threading.Thread(target=rest, daemon=True)
    t.start()
    while t.is_alive():  # /metrics while the requests run
        seen.append(dms_gauges(server.metrics()))
        time.sleep(0.2)
    t.join()
    idle1 = dms_gauges(G.idle(server))

    margin, drift = decision_margin(ckpt, list(zip(prompts, tp1["tokens"])))
    print(f"served checkpoint: decision margin {margin:.3f}, bf16 drift {drift:.3f}, smallest "
          f"TP=1 lead {min(tp1['leads']):.3f}; {len(seen)} gauge readings")
    assert margin >= MARGIN and margin >= 10 * drift, (margin, drift)
    assert min(tp1["leads"]) >= LEAD, tp1["leads"]
    assert got == tp1["tokens"], (got, tp1["tokens"])

    for idle in (idle0, idle1):  # nothing live or evicted, only the state region in use
        assert idle["vllm:dms_live_kv_tokens"] == 0 == idle["vllm:dms_evicted_kv_tokens"], idle
        assert idle["vllm:dms_compression_ratio"] == 1.0, idle
    assert idle1 == idle0, (idle0, idle1)
    total = idle0["vllm:dms_arena_bytes_in_use"] + idle0["vllm:dms_arena_bytes_free"]
    published = {tuple(g) for g in tp1["gauges"]}
    busy = [g for g in seen if g.get("vllm:dms_live_kv_tokens", 0) > 0]
    assert busy, f"no reading showed a running request: {seen[:3]}"
    for g in busy:
        pair = (int(g["vllm:dms_live_kv_tokens"]), int(g["vllm:dms_evicted_kv_tokens"]))
        assert pair in published, (pair, sorted(published))
        assert g["vllm:dms_arena_bytes_in_use"] > idle0["vllm:dms_arena_bytes_in_use"], g
        assert g["vllm:dms_arena_bytes_in_use"] + g["vllm:dms_arena_bytes_free"] == total, g
    assert max(g["vllm:dms_evicted_kv_tokens"] for g in busy) > 0, busy
