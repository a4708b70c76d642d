"""Bar chart of a speed JSON's ratios vs vLLM BF16 (decode and prefill, per engine and c).

    python benchmarks/plot_speed.py benchmarks/results/speed-qwen3-8b-2026-11-29.json
writes the PNG next to the JSON (same stem). Needs matplotlib.
"""
from __future__ import annotations

import json
import os
import sys


def plot(path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in json.load(open(path)) if "decode_x_bf16" in r]
    engines = sorted({r["engine"] for r in rows}, key=lambda e: (e != "vllm-bf16", e))
    concs = sorted({r["c"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    width = 0.8 / max(len(engines), 1)
    for ax, key, title in ((axes[0], "decode_x_bf16", "decode tok/s vs vLLM BF16"),
                           (axes[1], "prefill_x_bf16", "prefill tok/s vs vLLM BF16")):
        for i, eng in enumerate(engines):
            vals = {r["c"]: r[key] for r in rows if r["engine"] == eng}
            xs = [j + i * width for j, c in enumerate(concs) if c in vals]
            bars = ax.bar(xs, [vals[c] for c in concs if c in vals], width, label=eng)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(concs))],
                      [f"c={c}" for c in concs])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{r0['model']}: {r0.get('device', '')}, vLLM {r0.get('vllm_version', '')}, "
                 f"commit {r0.get('commit', '')}, {r0.get('date', '')}", fontsize=9)
    out = os.path.splitext(path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(plot(p))
