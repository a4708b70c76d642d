"""`vllm serve` + `vllm bench serve`: dms_fp8 vs dense BF16 at the same --gpu-memory-utilization.

    python benchmarks/serve_bench.py --model DIR --name llama-3.2-1b --gpu-util 0.12 \
        --out-dir benchmarks/results [--engines vllm-bf16 dms_fp8] [--prefix-len 0]
    python benchmarks/serve_bench.py --model DIR --name llama-3.2-1b --gpu-util 0.12 \
        --workload decode-heavy mixed prefill-heavy --engines vllm-bf16 vllm-fp8 dms_fp8

--workload runs named traffic shapes (WORKLOADS), each for every engine in one run; rows carry
the workload's name, ratios are taken within a workload, and a Markdown table plus a PNG chart
(output throughput and mean TPOT per workload and engine) are written beside the JSON.

Each engine: a real server (tests/reliability/gpu_util.Server; dummy weights for a synthetic
checkpoint), then vLLM's own load generator (random dataset, ignore_eos), /metrics polled every
second (peak waiting / running / kv_cache_usage_perc, the DMS gauges at mid-run), and after the
run the server must drain to idle (usage 0; after /reset_prefix_cache the arena back to the
bytes in use it had before the run: `drained`). Rows go to serve-<name>-<date>.json (a list, rows of
earlier runs of the same file kept) plus a Markdown table and the metrics excerpt.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reliability"))

from gpu_util import Server  # noqa: E402

ENGINES = {"vllm-bf16": "auto", "vllm-fp8": "fp8", "dms_fp8": "dms_fp8"}
# name -> lengths, prompts, concurrency; ranges: vLLM's --random-range-ratio, uniform in
# [len * (1 - r), len * (1 + r)]: mixed has inputs 256..8192 and outputs 128..2048
WORKLOADS = {
    "decode-heavy": dict(input_len=1024, output_len=4096, num_prompts=512, concurrency=256),
    "mixed": dict(input_len=4224, output_len=1088, num_prompts=512, concurrency=128,
                  range_ratio={"input": 3968 / 4224, "output": 960 / 1088}),
    "prefill-heavy": dict(input_len=8192, output_len=128, num_prompts=256, concurrency=64),
}


class Poller(threading.Thread):
    """Samples /metrics every second: peaks, and the DMS lines once the run is under way."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.stop, self.peak, self.excerpt = server, False, {}, ""

    def run(self):
        import requests
        t0 = time.monotonic()
        while not self.stop:
            try:
                m = self.server.metrics()
            except Exception:  # noqa: BLE001  (a slow scrape under load: try again)
                time.sleep(1)
                continue
            for k in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                      "vllm:kv_cache_usage_perc", "vllm:dms_live_kv_tokens",
                      "vllm:dms_arena_bytes_in_use"):
                if k in m:
                    self.peak[k] = max(self.peak.get(k, 0.0), m[k])
            if not self.excerpt and time.monotonic() - t0 > 15 and m.get(
                    "vllm:num_requests_running", 0) > 0:
                text = requests.get(self.server.url + "/metrics", timeout=10).text
                self.excerpt = "\n".join(
                    line for line in text.splitlines()
                    if line.startswith(("vllm:dms_", "vllm:kv_cache_usage_perc",
                                        "vllm:num_requests_")))
            time.sleep(1)


def bench(server: Server, a, out_json: str) -> dict:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
           "--backend", "openai", "--base-url", server.url, "--model", a.model,
           "--tokenizer", a.model, "--dataset-name", "random",
           "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
           "--random-prefix-len", str(a.prefix_len),
           *(["--random-range-ratio", json.dumps(a.range_ratio)] if a.range_ratio else []),
           "--max-concurrency", str(a.concurrency), "--num-prompts", str(a.num_prompts),
           "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result",
           "--result-dir", os.path.dirname(out_json),
           "--result-filename", os.path.basename(out_json)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    print(p.stdout[-2500:], flush=True)
    if p.returncode != 0 or not os.path.exists(out_json):
        raise RuntimeError(f"vllm bench serve failed rc={p.returncode}: {p.stderr[-2000:]}")
    return json.load(open(out_json))


def wait_idle(server: Server, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if (m.get("vllm:num_requests_running", 1) == 0
                and m.get("vllm:num_requests_waiting", 1) == 0
                and m.get("vllm:kv_cache_usage_perc", 1) == 0):
            return m
        time.sleep(1)
    return server.metrics()


def settle(server: Server) -> dict:
    """Empty the prefix cache, run a 1-token request (no full block: no new entry) so the DMS
    gauges are published after it, and return the idle metrics: the arena's idle value."""
    import requests
    assert requests.post(server.url + "/reset_prefix_cache", timeout=60).status_code == 200
    r = server.complete([1], max_tokens=1)
    assert r.status_code == 200, r.text
    return wait_idle(server)


def server_args(engine: str, a, synthetic: bool) -> list[str]:
    """`vllm serve` flags of one engine for workload ``a`` (max_model_len fits its longest)."""
    top = lambda n, k: int(n * (1 + (a.range_ratio or {}).get(k, 0.0))) + 1  # noqa: E731
    args = ["--kv-cache-dtype", ENGINES[engine], "--gpu-memory-utilization", str(a.gpu_util),
            "--max-model-len", str(top(a.input_len, "input") + a.prefix_len
                                   + top(a.output_len, "output") + 64),
            "--max-num-seqs", str(a.max_num_seqs), "--seed", "0"]
    if a.kv_bytes:  # the same KV bytes on an H100 or an H200 (vLLM then skips its profile)
        args += ["--kv-cache-memory-bytes", str(a.kv_bytes)]
    if synthetic:
        args += ["--load-format", "dummy"]
    if a.prefix_caching is not None:
        args += ["--enable-prefix-caching" if a.prefix_caching else "--no-enable-prefix-caching"]
    return args


def run_engine(engine: str, a) -> dict:
    synthetic = "dms_synthetic" in json.load(open(os.path.join(a.model, "config.json")))
    args = server_args(engine, a, synthetic)
    t0 = time.time()
    # dev mode: /reset_prefix_cache, so that a caching run can be checked for a drained arena
    with Server(a.model, *args, timeout=600, env={"VLLM_SERVER_DEV_MODE": "1"}) as s:
        started = time.time() - t0
        at_start = settle(s)  # the arena's idle value (state region), gauges published
        poll = Poller(s)
        poll.start()
        with tempfile.TemporaryDirectory() as tmp:
            res = bench(s, a, os.path.join(tmp, "result.json"))
        poll.stop = True
        idle = wait_idle(s)  # prefix entries, if caching, still hold their rows here
        drained = settle(s)
    row = dict(engine=engine, model=a.name, workload=a.workload, max_concurrency=a.concurrency,
               num_prompts=a.num_prompts, input_len=a.input_len, output_len=a.output_len,
               prefix_len=a.prefix_len, prefix_caching=a.prefix_caching,
               completed=res.get("completed"), failed=res.get("failed", 0),
               output_throughput=res.get("output_throughput"),
               total_token_throughput=res.get("total_token_throughput"),
               p99_tpot_ms=res.get("p99_tpot_ms"),
               preemptions=idle.get("vllm:num_preemptions_total"),
               mean_ttft_ms=res.get("mean_ttft_ms"), mean_tpot_ms=res.get("mean_tpot_ms"),
               p99_ttft_ms=res.get("p99_ttft_ms"), duration_s=res.get("duration"),
               gpu_memory_utilization=a.gpu_util, kv_cache_memory_bytes=a.kv_bytes or None,
               startup_s=round(started, 1),
               peak_requests_waiting=poll.peak.get("vllm:num_requests_waiting"),
               peak_requests_running=poll.peak.get("vllm:num_requests_running"),
               peak_kv_cache_usage_perc=poll.peak.get("vllm:kv_cache_usage_perc"),
               peak_dms_arena_bytes_in_use=poll.peak.get("vllm:dms_arena_bytes_in_use"),
               idle_kv_cache_usage_perc=idle.get("vllm:kv_cache_usage_perc"),
               idle_dms_arena_bytes_in_use=idle.get("vllm:dms_arena_bytes_in_use"),
               drained_dms_arena_bytes_in_use=drained.get("vllm:dms_arena_bytes_in_use"),
               drained=(drained.get("vllm:kv_cache_usage_perc") == 0
                        and drained.get("vllm:dms_arena_bytes_in_use")
                        == at_start.get("vllm:dms_arena_bytes_in_use")),
               prefix_cache_hits=idle.get("vllm:prefix_cache_hits_total"),
               prefix_cache_queries=idle.get("vllm:prefix_cache_queries_total"),
               metrics_excerpt=poll.excerpt)
    q = row["prefix_cache_queries"]
    row["hit_rate"] = row["prefix_cache_hits"] / q if q else None
    print(f"[{engine}] {json.dumps({k: v for k, v in row.items() if k != 'metrics_excerpt'})}",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--engines", nargs="+", default=["vllm-bf16", "dms_fp8"])
    ap.add_argument("--gpu-util", type=float, default=0.12)
    ap.add_argument("--kv-bytes", type=int, default=0,
                    help="KV memory of every engine (--kv-cache-memory-bytes; 0: by --gpu-util)")
    ap.add_argument("--input-len", type=int, default=8192)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefix-len", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--prefix-caching", type=int, choices=[0, 1], default=None)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=[],
                    help="named traffic shapes (override the length / prompt / concurrency flags)")
    a = ap.parse_args()
    a.range_ratio = None
    date = datetime.date.today().isoformat()
    path = os.path.join(a.out_dir, f"serve-{a.name}-{date}.json")
    os.makedirs(a.out_dir, exist_ok=True)
    for name in a.workload or [None]:
        w = argparse.Namespace(**{**vars(a), "workload": name, **WORKLOADS.get(name, {})})
        w.max_num_seqs = max(w.max_num_seqs, w.concurrency)  # the load generator's concurrency
        for eng in a.engines:
            try:
                row = run_engine(eng, w)
            except Exception as e:  # noqa: BLE001  (record the failure, go on with the next)
                row = dict(engine=eng, model=a.name, workload=name, error=str(e)[-1500:])
                print(f"[{eng}] FAILED: {e}", flush=True)
            row.update(commit=os.environ.get("VLLM_DMS_COMMIT", "unknown"), date=date,
                       device=_device(), vllm_version=_vllm_version())
            rows = json.load(open(path)) if os.path.exists(path) else []
            rows.append(row)
            json.dump(rows, open(path, "w"), indent=1)  # after every engine
            write_report(path, rows)
    print(open(path[:-5] + ".md").read())


def workload_table(rows: list[dict]) -> str:
    """Markdown: one line per (workload, engine), output throughput against BF16's."""
    cols = ("workload", "engine", "output tok/s", "x BF16", "x FP8", "total tok/s",
            "mean / p99 TTFT ms", "mean / p99 TPOT ms", "peak running", "preemptions",
            "failed", "drained")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    done = [r for r in rows if r.get("output_throughput")]
    base = {(r.get("workload"), r["engine"]): r["output_throughput"] for r in done}
    for r in done:
        wl = r.get("workload")
        ratio = lambda e: (f"{r['output_throughput'] / base[(wl, e)]:.2f}"  # noqa: E731
                           if (wl, e) in base else "-")
        out.append(f"| {wl or 'custom'} | {r['engine']} | {r['output_throughput']:.0f} | "
                   f"{ratio('vllm-bf16')} | {ratio('vllm-fp8')} | "
                   f"{r.get('total_token_throughput') or 0:.0f} | {r['mean_ttft_ms']:.0f} / "
                   f"{r['p99_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} / "
                   f"{r.get('p99_tpot_ms') or 0:.1f} | {r['peak_requests_running'] or 0:.0f} | "
                   f"{r.get('preemptions') or 0:.0f} | {r['failed']} | {r.get('drained')} |")
    out += [f"| {r.get('workload') or 'custom'} | {r['engine']} | FAILED: "
            f"{r['error'][-120:]!r} |" for r in rows if "error" in r]
    return "\n".join(out) + "\n"


def write_report(path: str, rows: list[dict]) -> None:
    """serve-*.md (the table) and serve-*.png (throughput and TPOT per workload) by the JSON."""
    open(path[:-5] + ".md", "w").write(workload_table(rows))
    done = [r for r in rows if r.get("output_throughput")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the table is the record; the chart needs matplotlib (on the GPU image)
    wls = list(dict.fromkeys(r.get("workload") or "custom" for r in done))
    engs = list(dict.fromkeys(r["engine"] for r in done))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "output_throughput", "output tok/s"),
                           (axes[1], "mean_tpot_ms", "mean TPOT ms")):
        for j, e in enumerate(engs):
            vals = [next((r[key] for r in done if r["engine"] == e
                          and (r.get("workload") or "custom") == w), 0) for w in wls]
            ax.bar([i + j / (len(engs) + 1) for i in range(len(wls))], vals,
                   width=1 / (len(engs) + 1), label=e)
        ax.set_xticks([i + 0.5 - 1 / (len(engs) + 1) for i in range(len(wls))], wls)
        ax.set_ylabel(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path[:-5] + ".png", dpi=110)
    plt.close(fig)


def _device() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _vllm_version() -> str:
    import vllm
    return vllm.__version__


if __name__ == "__main__":
    main()
