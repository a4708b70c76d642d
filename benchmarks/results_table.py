"""Print the Markdown summary of benchmarks/results/*.json (what the README's tables are pasted from)."""
import glob
import json
import os

ROOT = os.path.join(os.path.dirname(__file__), "results")


def speed():
    print("| model | engine | c | decode tok/s | decode x BF16 | prefill x BF16 | KV bytes/seq | KV x less than BF16 |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(ROOT, "speed-*.json"))):
        for r in json.load(open(path)):
            if "c" not in r:
                continue
            print(f"| {r['model']} | {r['engine']} | {r['c']} | {r['decode_tok_s']:.1f} | "
                  f"{r['decode_x_bf16']:.2f} | {r['prefill_x_bf16']:.2f} | "
                  f"{r['kv_bytes_per_seq']:.0f} | {r.get('kv_bytes_x_bf16', 0):.1f} |")


def correctness():
    print("| model | prompts x steps | greedy match | decision match | live-count match | KV bytes/seq DMS | BF16 |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(ROOT, "correctness-*.json"))):
        for r in json.load(open(path)):
            print(f"| {r['model']} | {r['prompts']} x {r['steps']} | {r['greedy_token_match']:.3f} | "
                  f"{r['decision_match']:.3f} | {r['live_count_match']:.3f} | "
                  f"{r['kv_bytes_per_seq_dms']} | {r['kv_bytes_per_seq_bf16']} |")


def quality():
    print("| model | path | measured compression | KLD vs no-evict | token match | PPL | PPL base |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(ROOT, "quality-*.json"))):
        for r in json.load(open(path)):
            print(f"| {r['model']} | {r['path']} | {r['measured_compression']:.2f} | "
                  f"{r['kld_vs_noevict']:.3f} | {r['token_match']:.3f} | {r['ppl']:.2f} | "
                  f"{r['ppl_base']:.2f} |")


if __name__ == "__main__":
    speed(); print(); correctness(); print(); quality()
