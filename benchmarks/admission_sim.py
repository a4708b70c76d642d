"""Admission through vLLM's real schedulers, no model: how many requests each KV format keeps
running at one KV budget, for the serve_bench workloads (issue 15).

    python benchmarks/admission_sim.py --shape llama-3.2-1b --kv-gib 4 8 \
        --workload decode-heavy mixed prefill-heavy --out benchmarks/results/admission-X.json

For each workload (``serve_bench.WORKLOADS``) and engine the same KV bytes become blocks as
vLLM's ``get_kv_cache_configs`` sizes them: vllm-bf16 / vllm-fp8 run vLLM's ``Scheduler`` on a
FullAttentionSpec of that dtype, dms_fp8 runs ``DMSScheduler`` on DMSCompactSpec with a
stand-in worker that reports after each step, as the real one does, rows that keep the window
and 1 in ``--cr`` of the older tokens (``test_scheduler.RowsWorker``). Server defaults of an H100/H200:
chunked prefill with 8192 batched tokens, prefix caching on, max_num_seqs as serve_bench sets. The client is ``vllm bench serve --max-concurrency C``: C requests in
flight, a new one sent when one finishes; lengths uniform in len*(1-r)..len*(1+r), seeded.

Per engine: scheduler steps to serve every request, output tokens per step (the mean decode
batch), peak and mean running, preemptions, and the steps where requests waited although token
budget and seats were left (KV-blocked) with the KV usage then: a scheduler that fills its
memory is blocked only near usage 1. These are scheduler counts, not speeds: the GPU time of a
step is not modeled (``serve_bench.py`` measures that).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import test_scheduler as ts  # noqa: E402  (sets vLLM's CPU platform)
import torch  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_kv_cache_configs  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from serve_bench import WORKLOADS  # noqa: E402
from vllm_dms.patches.engine import DMS_BLOCK_SIZE  # noqa: E402

ENGINES = ("vllm-bf16", "vllm-fp8", "dms_fp8")
DENSE_DTYPE = {"vllm-bf16": torch.bfloat16, "vllm-fp8": torch.float8_e4m3fn}
BATCHED_TOKENS = 8192  # vllm serve's default on a >= 70 GiB GPU
# --block-size each engine starts with: vLLM's 16, dms_fp8's own default (slots per sub-page)
BLOCK = {"vllm-bf16": 16, "vllm-fp8": 16, "dms_fp8": DMS_BLOCK_SIZE}


def load_shape(name: str) -> dict:
    c = json.load(open(os.path.join(HERE, "shapes.json")))[name]
    return dict(layers=c["num_hidden_layers"], heads=c["num_key_value_heads"],
                head_dim=c["head_dim"], window=c["dms_window_size"])


def draw_requests(w: dict, n: int, seed: int, len_scale: float) -> list[tuple[int, int]]:
    """(prompt, output) lengths of n requests, as the random dataset draws them."""
    rng = random.Random(seed)
    r = w.get("range_ratio") or {}

    def one(key: str, length: int) -> int:
        ratio = r.get(key, 0.0)
        lo, hi = int(length * (1 - ratio)), int(length * (1 + ratio))
        return max(1, round(rng.randint(lo, hi) * len_scale))
    return [(one("input", w["input_len"]), one("output", w["output_len"])) for _ in range(n)]


def build(engine: str, shape: dict, kv_bytes: int, max_num_seqs: int, max_len: int, model: str,
          prefix_caching: bool):
    vc = ts.make_vllm_config(model, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=BATCHED_TOKENS, max_model_len=max_len,
                             enable_prefix_caching=prefix_caching, block_size=BLOCK[engine])
    if engine == "dms_fp8":
        from vllm_dms.engine import spec as spec_mod
        spec_mod.register_spec()
        spec = spec_mod.DMSCompactSpec(block_size=BLOCK[engine], num_kv_heads=shape["heads"],
                                       head_size=shape["head_dim"], dtype=torch.uint8,
                                       dms_window=shape["window"], dms_max_num_seqs=max_num_seqs)
    else:
        spec = FullAttentionSpec(block_size=BLOCK[engine], num_kv_heads=shape["heads"],
                                 head_size=shape["head_dim"], dtype=DENSE_DTYPE[engine])
    layers = ts.layer_names(shape["layers"])
    blocks = get_kv_cache_configs(vc, [dict.fromkeys(layers, spec)], [kv_bytes])[0].num_blocks
    if engine == "dms_fp8":
        from vllm_dms.engine.scheduler import DMSScheduler
        return ts.make_scheduler(DMSScheduler, vc, spec, shape["layers"], blocks), blocks
    return ts.make_scheduler(Scheduler, vc, spec, shape["layers"], blocks), blocks


def simulate(engine: str, shape: dict, reqs: list[tuple[int, int]], concurrency: int,
             kv_bytes: int, max_num_seqs: int, model: str, cr: int, prefix_caching: bool,
             max_steps: int) -> dict:
    max_len = max(p + o for p, o in reqs) + 64
    sched, blocks = build(engine, shape, kv_bytes, max_num_seqs, max_len, model, prefix_caching)
    mgr = sched.kv_cache_manager
    step_fn = (ts.RowsWorker(mgr, ts.dms_live(shape["window"], cr)).step
               if engine == "dms_fp8" else ts.runner_output)
    sent = finished = steps = out_tokens = preempted = 0
    running, usage_blocked, peak_usage, steps_waiting = [], [], 0.0, 0

    def send(k: int) -> None:
        nonlocal sent
        for _ in range(k):
            if sent < len(reqs):
                p, o = reqs[sent]
                sched.add_request(ts.make_request(f"r{sent}", p, o, token=sent % 30000,
                                                  block_size=BLOCK[engine]))
                sent += 1
    send(concurrency)
    while sched.has_requests():
        assert steps < max_steps, f"{engine}: not done after {max_steps} steps"
        out = sched.schedule()
        mro = step_fn(sched, out)
        outputs = sched.update_from_output(out, mro)
        steps += 1
        out_tokens += sum(1 for t in mro.sampled_token_ids if t)
        preempted += len(out.preempted_req_ids)
        running.append(len(sched.running))
        peak_usage = max(peak_usage, mgr.usage)
        if sched.waiting:
            steps_waiting += 1
            # waiting with token budget and seats to spare: what held them back is KV memory
            if (sum(out.num_scheduled_tokens.values()) < BATCHED_TOKENS
                    and len(sched.running) < max_num_seqs):
                usage_blocked.append(mgr.usage)
        done = sum(o.finish_reason is not None for e in outputs.values() for o in e.outputs)
        finished += done
        send(done)
    assert finished == len(reqs), (engine, finished, len(reqs))
    assert mgr.reset_prefix_cache(), f"{engine}: a request still holds KV after the run"
    return dict(engine=engine, num_blocks=blocks, steps=steps, output_tokens=out_tokens,
                tokens_per_step=out_tokens / steps, peak_running=max(running),
                mean_running=statistics.fmean(running), preemptions=preempted,
                steps_with_waiting=steps_waiting, kv_blocked_steps=len(usage_blocked),
                mean_usage_kv_blocked=statistics.fmean(usage_blocked) if usage_blocked else None,
                peak_usage=peak_usage, drained=mgr.usage == 0.0)


def run(a) -> list[dict]:
    shape, model = load_shape(a.shape), ts.model_dir(tempfile.mkdtemp())
    rows = []
    for kv_bytes, name in ((int(g * 2 ** 30), w) for g in a.kv_gib for w in a.workload):
        w = WORKLOADS[name]
        n = a.num_prompts or w["num_prompts"]
        conc = min(a.concurrency or w["concurrency"], n)
        reqs = draw_requests(w, n, a.seed, a.len_scale)
        max_num_seqs = max(128, conc)  # as serve_bench starts the server
        for eng in a.engines:
            r = simulate(eng, shape, reqs, conc, kv_bytes, max_num_seqs, model, a.cr,
                         not a.no_prefix_caching, a.max_steps)
            r.update(workload=name, shape=a.shape, kv_bytes=kv_bytes, num_prompts=n,
                     max_concurrency=conc, max_num_seqs=max_num_seqs, cr=a.cr,
                     len_scale=a.len_scale, prefix_caching=not a.no_prefix_caching)
            rows.append(r)
            print(f"{kv_bytes / 2 ** 30:5.1f} GiB {name:13s} {eng:9s} blocks {r['num_blocks']:7d} steps {r['steps']:6d} "
                  f"tok/step {r['tokens_per_step']:7.1f} running peak {r['peak_running']:4d} "
                  f"mean {r['mean_running']:6.1f} preempt {r['preemptions']:5d} kv-blocked steps "
                  f"{r['kv_blocked_steps']:5d} at usage {r['mean_usage_kv_blocked'] or 0:.2f}",
                  flush=True)
    for r in rows:
        for eng, key in (("vllm-bf16", "tokens_per_step_x_bf16"),
                         ("vllm-fp8", "tokens_per_step_x_fp8")):
            base = next((b for b in rows if b["workload"] == r["workload"]
                         and b["kv_bytes"] == r["kv_bytes"] and b["engine"] == eng), None)
            r[key] = r["tokens_per_step"] / base["tokens_per_step"] if base else None
    return rows


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[dict]) -> str:
    cols = ("KV GiB", "workload", "engine", "blocks", "steps", "output tok / step", "x BF16",
            "x FP8", "peak / mean running", "preemptions", "steps waiting", "KV-blocked steps",
            "KV usage when blocked")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        x, x8 = r["tokens_per_step_x_bf16"], r["tokens_per_step_x_fp8"]
        uw = r["mean_usage_kv_blocked"]
        out.append(f"| {r['kv_bytes'] / 2 ** 30:g} | {r['workload']} | {r['engine']} | "
                   f"{r['num_blocks']} | {r['steps']} | {r['tokens_per_step']:.1f} | "
                   f"{_ratio(x)} | {_ratio(x8)} | "
                   f"{r['peak_running']} / {r['mean_running']:.1f} | {r['preemptions']} | "
                   f"{r['steps_with_waiting']} | {r['kv_blocked_steps']} | "
                   f"{_ratio(uw)} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--kv-gib", type=float, nargs="+", required=True,
                    help="KV memory of every engine (GiB); several: one run each")
    ap.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["decode-heavy"])
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--cr", type=int, default=8, help="1 in cr tokens kept outside the window")
    ap.add_argument("--num-prompts", type=int, default=0, help="override the workload's")
    ap.add_argument("--concurrency", type=int, default=0, help="override the workload's")
    ap.add_argument("--len-scale", type=float, default=1.0, help="scale every length (tests)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=200_000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = run(a)
    print(table(rows))
    if a.out:
        import vllm
        meta = dict(date=datetime.date.today().isoformat(), vllm_version=vllm.__version__,
                    device="cpu (scheduler only)", commit=os.environ.get("VLLM_DMS_COMMIT",
                                                                         "unknown"), rows=rows)
        json.dump(meta, open(a.out, "w"), indent=1)
        open(a.out[:-5] + ".md", "w").write(table(rows))


if __name__ == "__main__":
    main()
