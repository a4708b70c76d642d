"""benchmarks/admission_sim.py: the same KV bytes through vLLM's Scheduler (BF16, FP8) and the
DMSScheduler, on a decode-heavy shape scaled down so that BF16 is KV-limited."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import admission_sim as adm  # noqa: E402


def test_dms_runs_every_request_where_bf16_preempts():
    # 32 requests of 256 + 1024 tokens; 0.3 GiB holds ~9 BF16 ones at full length, every DMS one
    a = argparse.Namespace(shape="llama-3.2-1b", kv_gib=[0.3], workload=["decode-heavy"],
                           engines=list(adm.ENGINES), cr=8, num_prompts=32, concurrency=32,
                           len_scale=0.25, no_prefix_caching=False, seed=0, max_steps=20_000)
    rows = {r["engine"]: r for r in adm.run(a)}
    bf16, fp8, dms = rows["vllm-bf16"], rows["vllm-fp8"], rows["dms_fp8"]
    total = sum(o for _, o in adm.draw_requests(adm.WORKLOADS["decode-heavy"], 32, 0, 0.25))
    for r in rows.values():
        assert r["drained"], r
        assert r["output_tokens"] == total, r  # a preempted request resumes, samples no token twice
    assert dms["peak_running"] == 32 and dms["preemptions"] == 0, dms
    assert bf16["preemptions"] > 0 and bf16["mean_running"] < 16, bf16
    assert fp8["mean_running"] > bf16["mean_running"], (fp8, bf16)
    assert dms["tokens_per_step_x_bf16"] > 2.0 and dms["tokens_per_step_x_fp8"] > 1.0, dms
    assert dms["steps"] < fp8["steps"] < bf16["steps"]
    assert "| 0.3 | decode-heavy | dms_fp8 |" in adm.table(list(rows.values()))
