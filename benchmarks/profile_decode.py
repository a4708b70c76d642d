"""Where decode time goes: torch-profiler table of one engine's decode-heavy run.

    python benchmarks/profile_decode.py --model DIR --kv dms_fp8 --c 8 [--eager] [--out trace.json]
Prints the step time and the top CUDA kernels by total device time (inside CUDA graphs too), so
the DMS per-layer overhead (store, split-K, reduce, lane/decision ops, feedback copy) can be
compared with vLLM's FlashAttention decode on the same checkpoint and prompts.
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
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv", default="dms_fp8")
    ap.add_argument("--c", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    extra = dict(block_size=64) if a.kv == "dms_fp8" else {}
    llm = LLM(a.model, load_format="dummy", kv_cache_dtype=a.kv, max_model_len=a.ctx + a.gen,
              max_num_seqs=a.c, max_num_batched_tokens=a.ctx + a.gen, gpu_memory_utilization=0.6,
              enforce_eager=a.eager, seed=0, **extra)
    ps = [{"prompt_token_ids": p} for p in prompts_for(a.model, a.ctx, a.c)]

    def run(gen):
        sp = SamplingParams(max_tokens=gen, min_tokens=gen, ignore_eos=True, temperature=0.0,
                            detokenize=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    t1, tn = run(1), run(a.gen)
    print(f"{a.kv} c={a.c}: decode step {1e3 * (tn - t1) / (a.gen - 1):.3f} ms "
          f"({a.c * (a.gen - 1) / (tn - t1):.1f} tok/s)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(a.gen)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if a.out:
        prof.export_chrome_trace(a.out)


if __name__ == "__main__":
    main()
