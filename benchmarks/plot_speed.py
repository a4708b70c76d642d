"""Markdown table and bar chart of a speed JSON (benchmarks/bench_speed.py), for any engines.

    python benchmarks/plot_speed.py benchmarks/results/speed-qwen3-8b-2026-11-29.json
writes the .md and .png next to the JSON (same stem). The chart shows decode and prefill tok/s
per engine and c (median bar, min-max whisker over the repeated runs), each bar labelled with
its ratio vs vLLM BF16 when the JSON has BF16 rows, else with its tok/s. Only the PNG needs
matplotlib; without it the table is still written.
"""
from __future__ import annotations

import json
import os
import sys

BASE = "vllm-bf16"
PANELS = (("decode_tok_s", "decode_x_bf16", "decode tok/s"),
          ("prefill_tok_s", "prefill_x_bf16", "prefill tok/s"))


def measured(rows: list[dict]) -> list[dict]:
    """Rows with measurements (a failed engine's row has only engine and error)."""
    return [r for r in rows if "c" in r]


def engines(rows: list[dict]) -> list[str]:
    """Engines with measurements, BF16 first (the reference), then by name."""
    return sorted({r["engine"] for r in measured(rows)}, key=lambda e: (e != BASE, e))


def series(rows: list[dict], key: str) -> dict[str, dict[int, tuple[float, float, float]]]:
    """engine -> c -> (median, min, max) of ``key``; rows of one run have no spread."""
    out: dict[str, dict[int, tuple[float, float, float]]] = {}
    for r in measured(rows):
        lo, hi = r.get(key + "_spread") or (r[key], r[key])
        out.setdefault(r["engine"], {})[r["c"]] = (r[key], lo, hi)
    return out


def bar_labels(rows: list[dict], key: str, ratio_key: str) -> dict[tuple[str, int], str]:
    """(engine, c) -> bar label: the ratio vs BF16 where there is one, else the tok/s."""
    return {(r["engine"], r["c"]): (f"{r[ratio_key]:.2f}x" if r.get(ratio_key) is not None
                                    else f"{r[key]:.0f}") for r in measured(rows)}


def _fmt(r: dict, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(r[key]) if r.get(key) is not None else "-"


def _spread(r: dict, key: str, fmt: str) -> str:
    lo, hi = r.get(key + "_spread") or (r[key], r[key])
    return f"{fmt.format(r[key])} ({fmt.format(lo)}-{fmt.format(hi)})"


def table(rows: list[dict]) -> str:
    """The Markdown table: medians with their min-max spread; ratios '-' without BF16/FP8."""
    m = rows[0] if rows else {}
    lines = [f"# Speed, {m.get('model', '?')} ({m.get('device', '?')}, vLLM "
             f"{m.get('vllm_version', '?')}, commit {m.get('commit', '?')}, {m.get('date', '?')})",
             "", "| engine | c | runs | prefill tok/s (min-max) | decode tok/s (min-max) | "
             "decode x BF16 | decode x FP8 | prefill x BF16 | KV bytes/seq | CUDA peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "c" not in r:
            lines.append(f"| {r['engine']} | - | {r.get('failed_runs', 1)} failed |"
                         + " |" * 7)
            continue
        lines.append(f"| {r['engine']} | {r['c']} | {r.get('runs', 1)} | "
                     f"{_spread(r, 'prefill_tok_s', '{:.0f}')} | "
                     f"{_spread(r, 'decode_tok_s', '{:.1f}')} | {_fmt(r, 'decode_x_bf16')} | "
                     f"{_fmt(r, 'decode_x_fp8')} | {_fmt(r, 'prefill_x_bf16')} | "
                     f"{_fmt(r, 'kv_bytes_per_seq', '{:.0f}')} | {_fmt(r, 'cuda_peak_gib')} |")
    return "\n".join(lines) + "\n"


def plot(path: str) -> str | None:
    """Write the PNG next to the JSON; None when it has no measured row."""
    rows = json.load(open(path))
    if not measured(rows):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, concs = engines(rows), sorted({r["c"] for r in measured(rows)})
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4))
    width = 0.8 / len(names)
    for ax, (key, ratio_key, title) in zip(axes, PANELS):
        _panel(ax, series(rows, key), bar_labels(rows, key, ratio_key), names, concs, width)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(concs))],
                      [f"c={c}" for c in concs])
        ax.set_title(title + (" (labels: x BF16)" if BASE in names else ""))
    axes[0].legend(fontsize=8)
    r0 = measured(rows)[0]
    fig.suptitle(f"{r0.get('model', '')}: {r0.get('device', '')}, vLLM "
                 f"{r0.get('vllm_version', '')}, commit {r0.get('commit', '')}, "
                 f"{r0.get('date', '')}", fontsize=9)
    out = os.path.splitext(path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _panel(ax, values, labels, names, concs, width) -> None:
    for i, eng in enumerate(names):
        cs = [c for c in concs if c in values.get(eng, {})]
        med = [values[eng][c][0] for c in cs]
        err = [[m - values[eng][c][1] for m, c in zip(med, cs)],
               [values[eng][c][2] - m for m, c in zip(med, cs)]]
        bars = ax.bar([concs.index(c) + i * width for c in cs], med, width, yerr=err,
                      capsize=2, label=eng)
        ax.bar_label(bars, labels=[labels[(eng, c)] for c in cs], fontsize=7)


def write(path: str) -> list[str]:
    """Write the .md (always) and the .png (if matplotlib is installed) of a speed JSON."""
    stem = os.path.splitext(path)[0]
    with open(stem + ".md", "w") as f:
        f.write(table(json.load(open(path))))
    written = [stem + ".md"]
    try:
        png = plot(path)
    except ImportError:
        print("matplotlib missing: no PNG (pip install matplotlib, then rerun this script)")
        png = None
    return written + ([png] if png else [])


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print("\n".join(write(p)))
