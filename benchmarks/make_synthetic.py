"""Write calibrated synthetic DMS checkpoints (config + real tokenizer) for speed work.

    python benchmarks/make_synthetic.py OUT_ROOT [--cr 8]

Calibrates on alice29.txt and reports the predicted per-layer eviction rate on held-out
lcet10.txt (both Project Gutenberg, from the brotli==1.2.1 sdist; VLLM_DMS_TEXT_DIR points there).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, "/work/shared/gpu")

from transformers import AutoTokenizer  # noqa: E402

from vllm_dms.tools import synthetic  # noqa: E402
from vllm_dms.tools.texts import gutenberg_text  # noqa: E402

SHAPES = os.path.join(os.path.dirname(__file__), "shapes.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_root")
    ap.add_argument("--cr", type=float, nargs="+", default=[8.0])
    ap.add_argument("--models", nargs="+", default=["llama-3.2-1b", "qwen3-8b"])
    a = ap.parse_args()
    shapes = json.load(open(SHAPES))
    report = {}
    for name in a.models:
        base = shapes[name]
        arch = "qwen3" if base["model_type"] == "qwen3" else "llama"
        for cr in a.cr:
            out = os.path.join(a.out_root, f"{name}-dms-cr{int(cr)}")
            os.makedirs(out, exist_ok=True)
            synthetic.copy_tokenizer(arch, out)
            tok = AutoTokenizer.from_pretrained(out)
            calib = tok(gutenberg_text("alice29.txt"))["input_ids"]
            held = tok(gutenberg_text("lcet10.txt"))["input_ids"]
            synthetic.write_checkpoint(base, out, cr, calib)
            hf = json.load(open(os.path.join(out, "config.json")))
            thr = hf["dms_initial_alpha_offset"] / hf["dms_alpha_scale"]
            rates = synthetic.measured_rates(hf, held, thr)
            report[os.path.basename(out)] = dict(target=1 - 1 / cr, heldout_min=min(rates),
                                                 heldout_max=max(rates), tokens=len(held))
            print(out, json.dumps(report[os.path.basename(out)]))
    json.dump(report, open(os.path.join(a.out_root, "synthetic_report.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
