"""Print the Markdown summary of benchmarks/results/*.json (what the README's tables are pasted from).

    python benchmarks/results_table.py [TABLE ...] [--out FILE]   # default: every table
"""
import argparse
import glob
import json
import os
import xml.etree.ElementTree as ET
from collections import Counter

ROOT = os.path.join(os.path.dirname(__file__), "results")


def files(kind: str):
    """The row lists of results/<kind>-*.json, one per file, in name order."""
    for path in sorted(glob.glob(os.path.join(ROOT, f"{kind}-*.json"))):
        yield json.load(open(path))


def header(*cols: str) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def speed():
    header("model", "engine", "c", "decode tok/s", "decode x BF16", "decode x FP8",
           "prefill x BF16", "KV bytes/seq", "KV x less than BF16")
    for rows in files("speed"):
        rows = [r for r in rows if "c" in r]
        bf16 = {(r["model"], r["c"]): r["kv_bytes_per_seq"] for r in rows
                if r["engine"] == "vllm-bf16"}
        for r in rows:
            less = bf16.get((r["model"], r["c"]))  # absent when BF16 did not run: "-"
            print(f"| {r['model']} | {r['engine']} | {r['c']} | {r['decode_tok_s']:.1f} | "
                  f"{_num(r.get('decode_x_bf16'))} | {_num(r.get('decode_x_fp8'))} | "
                  f"{_num(r.get('prefill_x_bf16'))} | {r['kv_bytes_per_seq']:.0f} | "
                  f"{_num(less and less / r['kv_bytes_per_seq'], '{:.1f}')} |")


def _num(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def correctness():
    header("model", "prompts x steps", "greedy match", "decision match", "live-count match",
           "KV bytes/seq DMS", "BF16")
    for rows in files("correctness"):
        for r in rows:
            print(f"| {r['model']} | {r['prompts']} x {r['steps']} | {r['greedy_token_match']:.3f} | "
                  f"{r['decision_match']:.3f} | {r['live_count_match']:.3f} | "
                  f"{r['kv_bytes_per_seq_dms']} | {r['kv_bytes_per_seq_bf16']} |")


def quality():
    # rows before issue 18 scored against the no-evict model (kld_vs_noevict, no context)
    header("model", "path", "context", "measured compression", "KLD vs base", "KLD vs no-evict",
           "token match", "PPL", "PPL no-evict", "PPL base")
    for rows in files("quality"):
        for r in rows:
            kne = r.get("kld_vs_noevict", (r.get("details") or {}).get("kld_vs_noevict"))
            print(f"| {r['model']} | {r['path']} | {r.get('context') or '-'} | "
                  f"{r['measured_compression']:.2f} | {_num(r.get('kld_vs_base'), '{:.3f}')} | "
                  f"{_num(kne, '{:.3f}')} | {r['token_match']:.3f} | {r['ppl']:.2f} | "
                  f"{_num(r.get('ppl_noevict'))} | {r['ppl_base']:.2f} |")


def chunked():
    header("model", "chunk tokens", "greedy match vs ref", "tokens vs one-shot",
           "live counts vs one-shot", "live-count match vs ref", "mechanics live match",
           "mismatched rows explained", "near-threshold base rate")
    for rows in files("correctness-chunked"):
        for r in rows:
            g = r.get("live_count_gap") or {}
            gap = (f"{g['rows_explained']}/{g['rows_mismatched']}" if g else "")
            base = f"{g['near_threshold_base_rate']:.4f}" if "near_threshold_base_rate" in g else ""
            vs = lambda k: f"{r[k]:.3f}" if k in r else "(is one-shot)"  # noqa: E731
            print(f"| {r['model']} | {r.get('chunk_tokens') or 'off'} | "
                  f"{r['greedy_token_match']:.3f} | {vs('token_match_vs_one_shot')} | "
                  f"{vs('live_match_vs_one_shot')} | {r['live_count_match']:.3f} | "
                  f"{r['mechanics_live_count_match']:.3f} | {gap} | {base} |")


def prefix():
    header("model", "engine", "prefix + input / out", "prefix caching", "concurrency x prompts",
           "failed", "hit rate", "mean TTFT ms", "p99 TTFT ms", "mean TPOT ms", "output tok/s")
    for rows in files("serve-prefix"):
        for r in rows:
            if "output_throughput" not in r:
                continue
            hit = f"{r['hit_rate']:.3f}" if r.get("hit_rate") is not None else "-"
            print(f"| {r['model']} | {r['engine']} | {r['prefix_len']} + {r['input_len']} / "
                  f"{r['output_len']} | {'on' if r['prefix_caching'] else 'off'} | "
                  f"{r['max_concurrency']} x {r['num_prompts']} | {r['failed']} | {hit} | "
                  f"{r['mean_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['mean_tpot_ms']:.2f} | "
                  f"{r['output_throughput']:.0f} |")


def gpu_suite():
    header("JUnit file", "test file", "passed", "failed", "errors", "skipped")
    for path in sorted(glob.glob(os.path.join(ROOT, "junit-gpu-*.xml"))):
        per = {}
        for tc in ET.parse(path).iter("testcase"):
            state = next((c.tag for c in tc if c.tag in ("failure", "error", "skipped")), "passed")
            per.setdefault(tc.get("classname"), Counter())[state] += 1
        for cls, c in sorted(per.items()):
            print(f"| {os.path.basename(path)} | {cls} | {c['passed']} | {c['failure']} | "
                  f"{c['error']} | {c['skipped']} |")


def host():
    header("file", "running", "stock us/step", "dms us/step", "dms x stock", "repeats x steps")
    for path in sorted(glob.glob(os.path.join(ROOT, "host-overhead-*.json"))):
        for r in json.load(open(path))["rows"]:
            print(f"| {os.path.basename(path)} | {r['running']} | {r['stock_us']:.1f} | "
                  f"{r['dms_us']:.1f} | {r['dms_x_stock']:.2f} | {r['repeats']} x {r['steps']} |")


def serve():
    header("model", "engine", "concurrency x prompts", "in/out tokens", "failed",
           "output tok/s", "x BF16", "mean TTFT ms", "mean TPOT ms", "peak waiting",
           "peak KV usage", "GPU util")
    for rows in files("serve"):
        rows = [r for r in rows if "output_throughput" in r and not r.get("prefix_len")]
        base = {r["model"]: r["output_throughput"] for r in rows if r["engine"] == "vllm-bf16"}
        for r in rows:
            x = r["output_throughput"] / base[r["model"]] if r["model"] in base else float("nan")
            print(f"| {r['model']} | {r['engine']} | {r['max_concurrency']} x {r['num_prompts']} | "
                  f"{r['input_len']}/{r['output_len']} | {r['failed']} | "
                  f"{r['output_throughput']:.0f} | {x:.2f} | {r['mean_ttft_ms']:.0f} | "
                  f"{r['mean_tpot_ms']:.1f} | {r['peak_requests_waiting']:.0f} | "
                  f"{r['peak_kv_cache_usage_perc']:.3f} | {r['gpu_memory_utilization']} |")


def mechanics():
    header("model", "greedy match", "decision match", "mechanics token match",
           "mechanics live match", "mechanics max logprob diff", "graphs")
    for rows in files("correctness"):
        for r in rows:
            if "mechanics_token_match" in r:
                print(f"| {r['model']} | {r['greedy_token_match']:.3f} | {r['decision_match']:.4f} | "
                      f"{r['mechanics_token_match']:.3f} | {r['mechanics_live_count_match']:.3f} | "
                      f"{r['mechanics_max_abs_logprob_diff']:.4f} | {r['cuda_graphs']} |")


TABLES = dict(speed=speed, correctness=correctness, mechanics=mechanics, serve=serve,
              quality=quality, chunked=chunked, prefix=prefix, gpu_suite=gpu_suite, host=host)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tables", nargs="*", choices=sorted(TABLES), default=list(TABLES))
    ap.add_argument("--out", help="also write the tables to this Markdown file")
    a = ap.parse_args()
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        for name in a.tables:
            print(f"### {name}\n")
            TABLES[name]()
            print()
    print(buf.getvalue(), end="")
    if a.out:
        open(a.out, "w").write(buf.getvalue())
