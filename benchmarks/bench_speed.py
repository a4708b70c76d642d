"""Side-by-side decode/prefill benchmark: vLLM BF16, vLLM FP8, TurboQuant and dms_fp8.

Each engine runs in its own process on the same checkpoint (a calibrated synthetic DMS
checkpoint, dummy weights) and the same real-text prompts (Project Gutenberg, wrapped to ctx
tokens, a different offset per request). Dense pools are exact-sized (kv_cache_memory_bytes =
c_max requests of ctx+gen tokens); dms_fp8 gets the FP8 pool's bytes. Timing follows the vLLM
protocol used by FastDMS: after a warm-up, prefill tok/s = c*ctx / T(1 token) and decode tok/s =
c*(gen-1) / (T(gen) - T(1)), best of 2 within a process. Each engine's process is started
--repeats times, interleaved with the other engines (A, B, A, B, ...), so host drift and
clock changes hit all of them; a row reports the median of those runs under the usual field
name, plus every run (``*_runs``) and their min/max (``*_spread``). The JSON, its Markdown
table and its chart (``plot_speed.py``) are written after every run, for any set of engines.
With --profile-c C the first run of each engine also records, at concurrency C, the GPU time per
decode step by kernel (``decode_profile``) and the host time per step by call site: scheduler,
executor, attention metadata builders (``host_profile``, ``benchmarks/host_timer.py``).

    python benchmarks/bench_speed.py --model DIR --name qwen3-8b --out-dir results/ [--conc 1 8 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

ENGINES = {"vllm-bf16": "auto", "vllm-fp8": "fp8", "vllm-tq4": "turboquant_4bit_nc",
           "dms_fp8": "dms_fp8", "dms_fp8-eager": "dms_fp8", "dms_fp8-sync": "dms_fp8"}


def prompts_for(model_dir: str, ctx: int, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from vllm_dms.tools.texts import gutenberg_text
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(gutenberg_text("lcet10.txt") + gutenberg_text("alice29.txt"))["input_ids"]
    out = []
    for i in range(n):
        start = (i * 7919) % len(ids)
        seq = (ids[start:] + ids)[: ctx]
        out.append(seq)
    return out


def worker(a) -> None:
    import torch
    from vllm import LLM, SamplingParams
    kv = ENGINES[a.engine]
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_tok = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * hd
    maxc = max(a.conc)
    tokens = math.ceil((a.ctx + a.gen) / 16) * 16 * maxc
    pool = tokens * per_tok * (2 if kv == "auto" else 1)
    extra = {}
    if kv == "dms_fp8":
        extra = dict(block_size=64)
        pool = int(pool * 1.10)  # FP8 bytes + the arena's meta words and state region
    llm = LLM(model=a.model, load_format="dummy", dtype="bfloat16", kv_cache_dtype=kv,
              max_model_len=a.ctx + a.gen, kv_cache_memory_bytes=pool, max_num_seqs=maxc,
              max_num_batched_tokens=a.ctx + a.gen, gpu_memory_utilization=0.85,
              enable_prefix_caching=False, seed=0, enforce_eager=a.engine.endswith("-eager"),
              async_scheduling=False if a.engine.endswith("-sync") else None, **extra)
    is_async = llm.llm_engine.vllm_config.scheduler_config.async_scheduling
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    runner = type(runner.model_runner).__module__  # vllm.v1.worker.gpu.model_runner: MRv2
    all_prompts = prompts_for(a.model, a.ctx, maxc * 3)

    last_bytes = {}

    def run(c, gen, k):
        ps = [{"prompt_token_ids": p} for p in all_prompts[k * maxc: k * maxc + c]]
        sp = SamplingParams(max_tokens=gen, min_tokens=gen, ignore_eos=True, temperature=0.0,
                            detokenize=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = llm.generate(ps, sp, use_tqdm=False)
        torch.cuda.synchronize()
        assert all(len(o.outputs[0].token_ids) == gen for o in out)
        dt = time.perf_counter() - t
        if kv == "dms_fp8":
            last_bytes[c] = dms_bytes_per_seq(llm, c)
        return dt

    for c in a.conc:
        run(c, 4, 0)  # warm-up
        t1 = min(run(c, 1, k) for k in (1, 2))
        tn = min(run(c, a.gen, k) for k in (1, 2))
        row = dict(engine=a.engine, kv_cache_dtype=kv, c=c, ctx=a.ctx, gen=a.gen,
                   prefill_tok_s=c * a.ctx / t1, decode_tok_s=c * (a.gen - 1) / (tn - t1),
                   t1_s=t1, tgen_s=tn, pool_bytes=pool,
                   cuda_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   kv_bytes_per_seq=(per_tok * (2 if kv == "auto" else 1) * (a.ctx + a.gen)
                                     if kv != "dms_fp8" else last_bytes[c]),
                   async_scheduling=is_async, model_runner=runner)
        if c == a.profile_c:
            row["decode_profile"] = decode_profile(lambda gen: run(c, gen, 1), row)
            row["host_profile"] = host_profile(llm, lambda gen: run(c, gen, 1), row)
        print("ROW " + json.dumps(row), flush=True)


def decode_profile(run_gen, row, gen: int = 33, top: int = 15) -> dict:
    """GPU time per decode step by kernel (inside CUDA graphs too): a gen-token run minus a
    1-token run, so the prefill's kernels cancel out; and the 1-token run's own kernels (the
    prefill's: ``prefill_top``)."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(g):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            wall = run_gen(g)
        return wall, {e.key: (e.device_time_total, e.count) for e in prof.key_averages()
                      if e.device_time_total > 0}
    w1, k1 = kernels(1)
    wn, kn = kernels(gen)
    steps = gen - 1
    per = {name: ((t - k1.get(name, (0, 0))[0]) / steps, (n - k1.get(name, (0, 0))[1]) / steps)
           for name, (t, n) in kn.items()}
    busy = sum(t for t, _ in per.values())
    rows = sorted(per.items(), key=lambda x: -x[1][0])[:top]
    # the 1-token run is the prefill of c prompts (plus one sampling step): where prefill goes
    pre = sorted(k1.items(), key=lambda x: -x[1][0])[:top]
    out = dict(step_wall_us=1e6 * (wn - w1) / steps, step_gpu_busy_us=busy,
               launches_per_step=sum(n for _, n in per.values()),
               top=[[name[:90], round(t, 1), round(n, 2)] for name, (t, n) in rows],
               prefill_wall_us=1e6 * w1, prefill_gpu_busy_us=sum(t for t, _ in k1.values()),
               prefill_top=[[name[:90], round(t, 1), n] for name, (t, n) in pre])
    print(f"[profile {row['engine']} c={row['c']}] step wall {out['step_wall_us']:.0f} us, "
          f"GPU busy {busy:.0f} us, {out['launches_per_step']:.0f} launches/step", flush=True)
    for name, t, n in out["top"]:
        print(f"   {t:9.1f} us {n:7.1f}x  {name}", flush=True)
    print(f"[profile {row['engine']} c={row['c']}] prefill (1-token run) wall "
          f"{out['prefill_wall_us']:.0f} us, GPU busy {out['prefill_gpu_busy_us']:.0f} us",
          flush=True)
    for name, t, n in out["prefill_top"]:
        print(f"   {t:9.1f} us {n:7d}x  {name}", flush=True)
    return out


def host_profile(llm, run_gen, row, gen: int = 33) -> dict:
    """Host time per decode step by call site (benchmarks/host_timer.py): scheduler, executor,
    metadata builders; a gen-token run minus a 1-token run, without the CUDA profiler."""
    from host_timer import HostTimer, per_step

    def totals(g):
        with HostTimer(llm) as ht:
            run_gen(g)
        return ht.totals()
    out = per_step(totals(1), totals(gen), gen - 1)
    print(f"[host {row['engine']} c={row['c']}] us per decode step by call site", flush=True)
    for name, (us, n) in out.items():
        print(f"   {us:9.1f} us {n:7.2f}x  {name}", flush=True)
    return out


def dms_bytes_per_seq(llm, c: int) -> float:
    """Arena bytes the just-finished requests hold (their rows are released at the next step)."""
    from vllm_dms.worker.runtime import inprocess_engine
    mgr, rt = inprocess_engine(llm)
    slots = mgr.link.release[-c:]
    return sum(rt.slot_bytes(s) for s in slots) / len(slots)


def driver(a) -> None:
    runs = []  # every run's rows, in run order
    for rep in range(a.repeats):
        for eng in a.engines:  # interleaved (A, B, C, A, B, C, ...): drift hits every engine
            runs += run_engine(a, eng, profile=rep == 0)
            save(a, runs)  # after every run: a session cut short still leaves its rows


def run_engine(a, eng: str, profile: bool) -> list[dict]:
    """One worker process for one engine: its rows (one per c), or one error row."""
    cmd = [sys.executable, __file__, "--worker", "--engine", eng, "--model", a.model,
           "--ctx", str(a.ctx), "--gen", str(a.gen), "--conc", *map(str, a.conc),
           "--profile-c", str(a.profile_c if profile else 0)]  # the profile is one run's
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired as e:
        p = subprocess.CompletedProcess(cmd, -9, (e.stdout or b"").decode(errors="replace"),
                                        f"timeout after {a.timeout}s")
    got = [json.loads(l[4:]) for l in p.stdout.splitlines() if l.startswith("ROW ")]
    for line in p.stdout.splitlines():
        if line.startswith(("[profile", "[host", "   ")):
            print(line, flush=True)
    print(f"[{eng}] {time.time() - t0:.0f}s", flush=True)
    if p.returncode != 0 or not got:
        tail = (p.stderr or "")[-1500:]
        print(f"[{eng}] FAILED rc={p.returncode}\n{tail}", flush=True)
        return [dict(engine=eng, error=tail[-400:])]
    for r in got:
        print(f"[{eng}] c={r['c']} prefill {r['prefill_tok_s']:.0f} tok/s decode "
              f"{r['decode_tok_s']:.1f} tok/s peak {r['cuda_peak_gib']:.2f} GiB", flush=True)
    return got


SPREAD_KEYS = ("decode_tok_s", "prefill_tok_s")


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (engine, c) over the repeated runs: the median under the run's own field
    name, every run's value (``*_runs``) and their (min, max) (``*_spread``). The other fields
    are those of the run nearest the median decode; an engine with no good run keeps one error
    row. ``runs`` / ``failed_runs`` count them."""
    groups: dict[tuple[str, int], list[dict]] = {}
    failed: dict[str, list[dict]] = {}
    for r in runs:
        if "c" in r:
            groups.setdefault((r["engine"], r["c"]), []).append(r)
        else:
            failed.setdefault(r["engine"], []).append(r)
    out = [_merge(rs, len(failed.get(eng, ()))) for (eng, _), rs in groups.items()]
    measured = {eng for eng, _ in groups}
    out += [dict(rs[-1], failed_runs=len(rs)) for eng, rs in failed.items() if eng not in measured]
    return out


def _merge(rs: list[dict], failed_runs: int) -> dict:
    med = statistics.median(r["decode_tok_s"] for r in rs)
    row = dict(min(rs, key=lambda r: abs(r["decode_tok_s"] - med)))
    for key in SPREAD_KEYS:
        vals = [r[key] for r in rs]
        row.update({key: statistics.median(vals), key + "_runs": vals,
                    key + "_spread": [min(vals), max(vals)]})
    for key in ("decode_profile", "host_profile"):  # the one profiled run's
        profiled = [r[key] for r in rs if key in r]
        if profiled:
            row[key] = profiled[0]
    row.update(runs=len(rs), failed_runs=failed_runs)
    return row


def add_ratios(rows: list[dict]) -> None:
    """decode/prefill x BF16 and decode x FP8 from the medians; absent without that engine."""
    base = {r["c"]: r for r in rows if r.get("engine") == "vllm-bf16" and "c" in r}
    fp8 = {r["c"]: r for r in rows if r.get("engine") == "vllm-fp8" and "c" in r}
    for r in rows:
        if "c" in r and r["c"] in base:
            r["decode_x_bf16"] = r["decode_tok_s"] / base[r["c"]]["decode_tok_s"]
            r["prefill_x_bf16"] = r["prefill_tok_s"] / base[r["c"]]["prefill_tok_s"]
        if "c" in r and r["c"] in fp8:
            r["decode_x_fp8"] = r["decode_tok_s"] / fp8[r["c"]]["decode_tok_s"]


def save(a, runs) -> None:
    rows = aggregate(runs)
    add_ratios(rows)
    meta = dict(model=a.name, commit=os.environ.get("VLLM_DMS_COMMIT", "unknown"),
                date=datetime.date.today().isoformat(), device=_device(), vllm_version=_vllm(),
                repeats=a.repeats)
    for r in rows:
        r.update(meta)
    os.makedirs(a.out_dir, exist_ok=True)
    stem = os.path.join(a.out_dir, f"speed-{a.name}-{meta['date']}")
    json.dump(rows, open(stem + ".json", "w"), indent=1)
    from plot_speed import write  # benchmarks/ is on sys.path (this script's folder)
    write(stem + ".json")
    print(open(stem + ".md").read(), flush=True)


def _device() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _vllm() -> str:
    import vllm
    return vllm.__version__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", default="model")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--conc", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES))
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each engine, interleaved; rows report the median and spread")
    ap.add_argument("--profile-c", type=int, default=0,
                    help="also profile decode kernels at this concurrency (0: off)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--engine")
    a = ap.parse_args()
    worker(a) if a.worker else driver(a)


if __name__ == "__main__":
    main()
