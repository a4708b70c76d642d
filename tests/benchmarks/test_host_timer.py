"""benchmarks/host_timer.py on a real in-process engine: vllm.LLM with dms_fp8 on the CPU
(tests/cpu_engine.py), the same call sites bench_speed's host profile reads on a GPU."""
import os
import sys
from pathlib import Path

TESTS = Path(__file__).parent.parent
sys.path.insert(0, str(TESTS / "reliability"))
from gpu_util import run_py  # noqa: E402
from sim_engine import write_checkpoint  # noqa: E402

BODY = """
sys.path.insert(0, A["tests"]); sys.path.insert(0, A["benchmarks"])
import cpu_engine
cpu_engine.apply()
from vllm import LLM, SamplingParams
from host_timer import HostTimer, per_step
llm = LLM(A["model"], kv_cache_dtype="dms_fp8", max_model_len=256, max_num_seqs=2,
          kv_cache_memory_bytes=1 << 24, **cpu_engine.ENGINE_KW)
sched = llm.llm_engine.engine_core.engine_core.scheduler
before = sched.schedule
def gen(n):
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    with HostTimer(llm) as ht:
        llm.generate([{"prompt_token_ids": [5] * 40}] * 2, sp, use_tqdm=False)
    return ht.totals()
short, long = gen(1), gen(9)
out["short"], out["long"] = short, long
out["per_step"] = per_step(short, long, 8)
out["restored"] = sched.schedule == before and "schedule" not in vars(sched)
from vllm_dms.worker.backend import DMSMetadataBuilder
out["build_restored"] = getattr(DMSMetadataBuilder.build, "__wrapped__", None) is None
"""


def test_host_timer_counts_each_decode_step_and_restores(tmp_path):
    import cpu_engine
    model = write_checkpoint(tmp_path)
    env = {**cpu_engine.ENV, "VLLM_USE_V2_MODEL_RUNNER": "0"}
    res = run_py(BODY, dict(model=model, tests=str(TESTS),
                            benchmarks=str(TESTS.parent / "benchmarks")), env=env, timeout=900)
    step = res["per_step"]
    assert step["DMSScheduler.schedule"][1] == 1.0, step  # one schedule per decode step
    assert step["DMSScheduler.update_from_output"][1] == 1.0, step
    assert step["executor.execute_model"][1] == 1.0, step
    assert step["DMSMetadataBuilder.build"][1] == 1.0, step  # one KV cache group: one build
    for name, (seconds, calls) in res["long"].items():
        assert calls > 0 and seconds > 0, (name, seconds, calls)
    assert res["restored"] and res["build_restored"], res
