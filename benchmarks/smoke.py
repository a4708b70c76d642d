"""GPU smoke test: one engine, a few real-text prompts, dms_fp8, eager or with CUDA graphs.

    python benchmarks/smoke.py MODEL_DIR [--graphs] [--ctx 2048]
Prints generated token ids, the arena's per-slot bytes and the scheduler's DMS stats.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(__file__))

from bench_speed import prompts_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--n", type=int, default=4)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams

    from vllm_dms.worker.runtime import inprocess_engine
    t0 = time.time()
    llm = LLM(a.model, load_format="dummy", kv_cache_dtype="dms_fp8", max_model_len=a.ctx + 64,
              max_num_seqs=8, gpu_memory_utilization=0.5, enforce_eager=not a.graphs, seed=0,
              enable_prefix_caching=False)  # finished rows are released, not kept as entries
    print(f"engine up in {time.time() - t0:.1f}s", flush=True)
    ps = [{"prompt_token_ids": p} for p in prompts_for(a.model, a.ctx, a.n)]
    sp = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0.0, detokenize=False)
    t0 = time.time()
    outs = llm.generate(ps, sp, use_tqdm=False)
    print(f"generate {time.time() - t0:.2f}s")
    for o in outs:
        print("tokens", list(o.outputs[0].token_ids)[:12])
    mgr, rt = inprocess_engine(llm)
    slots = mgr.link.release[-a.n:]
    dense_fp8 = (a.ctx + 31) * rt.layout.num_layers * rt.layout.num_kv_heads * rt.layout.head_dim * 2
    for s in slots:
        b = rt.slot_bytes(s)
        print(f"slot {s}: arena bytes {b} vs dense FP8 {dense_fp8} -> {dense_fp8 / b:.2f}x")
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    print("dms_stats", sched.kv_cache_manager.dms_stats())
    print("SMOKE OK")


if __name__ == "__main__":
    main()
