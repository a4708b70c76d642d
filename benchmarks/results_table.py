"""Print the Markdown summary of benchmarks/results/*.json (what the README's tables are pasted from)."""
import glob
import json
import os

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
    header("model", "path", "measured compression", "KLD vs no-evict", "token match", "PPL",
           "PPL base")
    for rows in files("quality"):
        for r in rows:
            print(f"| {r['model']} | {r['path']} | {r['measured_compression']:.2f} | "
                  f"{r['kld_vs_noevict']:.3f} | {r['token_match']:.3f} | {r['ppl']:.2f} | "
                  f"{r['ppl_base']:.2f} |")


def serve():
    header("model", "engine", "concurrency x prompts", "in/out tokens", "failed",
           "output tok/s", "x BF16", "mean TTFT ms", "mean TPOT ms", "peak waiting",
           "peak KV usage", "GPU util")
    for rows in files("serve"):
        rows = [r for r in rows if "output_throughput" in r]
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


if __name__ == "__main__":
    for table in (speed, correctness, mechanics, serve, quality):
        table()
        print()
