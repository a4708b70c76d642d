"""Host time per decode step: vLLM's Scheduler vs DMSScheduler, through vLLM's real scheduler.

    python benchmarks/host_overhead.py [--running 8 64 256] [--steps 200] [--repeats 5]

For each running count: that many requests with 1024-token prompts are admitted and prefilled,
then `--steps` decode steps are timed, schedule() plus update_from_output() on the CPU
(vLLM's CPU platform, no model: a stand-in runner samples one token per request). The DMS
stand-in worker also reports its rows on the ModelRunnerOutput every step (as the real worker
does), so the scheduler's measurement path runs. Engines alternate, `--repeats` times; the
median step time of each and the DMS / stock ratio are printed and written as JSON. The
metadata builder is not in this figure (it runs in the worker).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import test_scheduler as ts  # noqa: E402  (sets vLLM's CPU platform)
import torch  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402

LAYERS, PROMPT = 16, 1024


def build(kind: str, running: int, model: str):
    vc = ts.make_vllm_config(model, max_num_seqs=running, max_num_batched_tokens=PROMPT * 8,
                             max_model_len=PROMPT + 4096)
    blocks = running * (PROMPT + 4096) // 16 + 16  # room for everyone at the dense bound
    if kind == "stock":
        spec = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=64,
                                 dtype=torch.bfloat16)
        sched = ts.make_scheduler(Scheduler, vc, spec, LAYERS, blocks)
        return sched, ts.runner_output
    from vllm_dms.engine import scheduler, spec
    spec.register_spec()
    dspec = ts.dms_spec(spec, max_num_seqs=running)
    sched = ts.make_scheduler(scheduler.DMSScheduler, vc, dspec, LAYERS, blocks)
    return sched, ts.RowsWorker(sched.dms, ts.dms_live_8x(sched.dms.layout.window)).step


def step_times(kind: str, running: int, steps: int, model: str) -> list[float]:
    sched, runner = build(kind, running, model)
    for i in range(running):
        sched.add_request(ts.make_request(f"r{i}", PROMPT, 10 ** 6, token=i))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.requests.values()):
        out = sched.schedule()
        sched.update_from_output(out, runner(sched, out))
    times = []
    for _ in range(steps):  # the stand-in runner is not timed: the worker's cost is the GPU's
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        mro = runner(sched, out)
        t2 = time.perf_counter()
        sched.update_from_output(out, mro)
        times.append((t1 - t0) + (time.perf_counter() - t2))
    assert len(out.num_scheduled_tokens) == running, "every request decodes each step"
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--running", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model = ts.model_dir(tempfile.mkdtemp())
    rows = []
    for running in a.running:
        med = {"stock": [], "dms": []}
        for _ in range(a.repeats):  # alternate, so drift on a shared machine hits both
            for kind in ("stock", "dms"):
                med[kind].append(statistics.median(step_times(kind, running, a.steps, model)))
        row = dict(running=running, steps=a.steps, repeats=a.repeats,
                   stock_us=statistics.median(med["stock"]) * 1e6,
                   dms_us=statistics.median(med["dms"]) * 1e6,
                   stock_us_runs=[x * 1e6 for x in med["stock"]],
                   dms_us_runs=[x * 1e6 for x in med["dms"]])
        row["dms_x_stock"] = row["dms_us"] / row["stock_us"]
        rows.append(row)
        print(f"running {running:4d}: stock {row['stock_us']:8.1f} us/step, dms "
              f"{row['dms_us']:8.1f} us/step, dms/stock {row['dms_x_stock']:.2f}", flush=True)
    import vllm
    meta = dict(date=datetime.date.today().isoformat(), vllm_version=vllm.__version__,
                device="cpu", commit=os.environ.get("VLLM_DMS_COMMIT", "unknown"), rows=rows)
    if a.out:
        json.dump(meta, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
