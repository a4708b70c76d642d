"""Follow-up chat turns against `vllm serve --kv-cache-dtype dms_fp8`, prefix reuse off and on.

    python benchmarks/multiturn_bench.py --model DIR --name llama-3.2-1b --out-dir results/

C conversations run concurrently, T turns each. Turn t's prompt is turn t-1's prompt, its
generated token ids and new user tokens (ids, through /v1/completions with return_token_ids), so
with --enable-prefix-caching every turn after the first can take the previous turn's rows.
Per engine: mean time to first token of turns >= 2 (streamed), the prefix-cache hit rate from
vLLM's own counters, and whether every turn's tokens equal the run without reuse. Rows are
appended to serve-<name>-<date>.json with a `prefix_caching` field.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reliability"))

from gpu_util import Server  # noqa: E402


def turn(server: Server, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first streamed token, generated token ids)."""
    import requests
    body = dict(model=server.cmd[4], prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                ignore_eos=True, stream=True, return_token_ids=True)
    t0, first, ids = time.perf_counter(), None, []
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            got = choice.get("token_ids") or []
            if got and first is None:
                first = time.perf_counter() - t0
            ids += got
    return first if first is not None else time.perf_counter() - t0, ids


def conversation(server: Server, a, seed: int) -> tuple[list[float], list[list[int]]]:
    rng = random.Random(seed)
    prompt = [rng.randrange(100, 20000) for _ in range(a.first_len)]
    ttfts, outs = [], []
    for _ in range(a.turns):
        ttft, ids = turn(server, prompt, a.gen)
        ttfts.append(ttft)
        outs.append(ids)
        prompt = prompt + ids + [rng.randrange(100, 20000) for _ in range(a.user_len)]
    return ttfts, outs


def run_engine(a, caching: bool) -> tuple[dict, list]:
    synthetic = "dms_synthetic" in json.load(open(os.path.join(a.model, "config.json")))
    args = ["--kv-cache-dtype", "dms_fp8", "--gpu-memory-utilization", str(a.gpu_util),
            "--max-model-len", str(a.max_len), "--seed", "0",
            "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"]
    if synthetic:
        args += ["--load-format", "dummy"]
    with Server(a.model, *args, timeout=600) as s:
        t0 = time.time()
        with ThreadPoolExecutor(a.conversations) as pool:
            convs = list(pool.map(lambda i: conversation(s, a, i), range(a.conversations)))
        wall = time.time() - t0
        m = s.metrics()
    later = [t for ttfts, _ in convs for t in ttfts[1:]]
    q, h = m.get("vllm:prefix_cache_queries_total", 0.0), m.get("vllm:prefix_cache_hits_total", 0.0)
    row = dict(engine="dms_fp8", model=a.name, prefix_caching=caching,
               conversations=a.conversations, turns=a.turns, first_len=a.first_len,
               user_len=a.user_len, gen=a.gen, failed=0, wall_s=round(wall, 2),
               mean_ttft_later_turns_ms=1e3 * sum(later) / len(later),
               mean_ttft_first_turn_ms=1e3 * sum(c[0][0] for c in convs) / len(convs),
               prefix_cache_hit_rate=h / q if q else 0.0, prefix_cache_hits=h,
               prefix_cache_queries=q, gpu_memory_utilization=a.gpu_util)
    return row, [c[1] for c in convs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-len", type=int, default=2048)
    ap.add_argument("--user-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--gpu-util", type=float, default=0.3)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    date = datetime.date.today().isoformat()
    path = os.path.join(a.out_dir, f"serve-{a.name}-{date}.json")
    os.makedirs(a.out_dir, exist_ok=True)
    rows, outs = [], {}
    for caching in (False, True):
        row, outs[caching] = run_engine(a, caching)
        rows.append(row)
        print(json.dumps(row), flush=True)
    same = sum(x == y for c0, c1 in zip(outs[False], outs[True]) for x, y in zip(c0, c1))
    total = a.conversations * a.turns
    for row in rows:
        row.update(turns_equal_to_no_reuse=f"{same}/{total}",
                   commit=os.environ.get("VLLM_DMS_COMMIT", "unknown"), date=date)
    old = json.load(open(path)) if os.path.exists(path) else []
    json.dump(old + rows, open(path, "w"), indent=1)
    print(f"turns with identical tokens with and without reuse: {same}/{total}")


if __name__ == "__main__":
    main()
