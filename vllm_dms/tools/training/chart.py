"""PNG chart of a training JSONL log: python -m vllm_dms.tools.training.chart LOG.jsonl OUT.png

Drawn with Pillow (a vLLM dependency; matplotlib is not installed on the GPU image). Panels: KL
to the teacher, decision (eviction) rate against its target, compression at the training
context, learning rate, each over the optimizer step.
"""
from __future__ import annotations

import json
import sys

PANELS = (("kl", "KL(teacher || student), nats/token", ("kl",)),
          ("rate", "eviction decision rate (blue) vs target (red)", ("evict_rate", "target")),
          ("comp", "compression at the training context (T / live keys)", ("compression",)),
          ("lr", "learning rate (decision rows)", ("lr",)))
COLORS = ((31, 119, 180), (214, 39, 40))


def read_steps(path: str) -> list[dict]:
    """The per-step records of a log (several runs appended: a later step replaces an earlier)."""
    by_step = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "step" in rec and "event" not in rec:
                by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def write_chart(log_path: str, png_path: str, width: int = 900, panel_h: int = 180) -> str | None:
    """Write the PNG; returns None, or the reason it was skipped (no Pillow, no steps)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return "chart skipped: Pillow is not installed (the JSONL log has every number)"
    steps = read_steps(log_path)
    if not steps:
        return "chart skipped: the log has no steps"
    img = Image.new("RGB", (width, panel_h * len(PANELS)), "white")
    draw = ImageDraw.Draw(img)
    xs = [r["step"] for r in steps]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    for p, (_, title, keys) in enumerate(PANELS):
        top, left, right, bottom = p * panel_h + 22, 70, width - 15, (p + 1) * panel_h - 20
        vals = [r.get(k) for k in keys for r in steps if r.get(k) is not None]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1e-9
        draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        draw.text((left, top - 16), title, fill="black")
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 4), f"step {x0}", fill="black")
        draw.text((right - 70, bottom + 4), f"step {x1}", fill="black")
        for c, key in enumerate(keys):
            pts = [(left + (r["step"] - x0) / (x1 - x0) * (right - left),
                    bottom - (r[key] - lo) / (hi - lo) * (bottom - top))
                   for r in steps if r.get(key) is not None]
            if len(pts) > 1:
                draw.line(pts, fill=COLORS[c % len(COLORS)], width=2)
    img.save(png_path, format="PNG")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    why = write_chart(argv[0], argv[1])
    print(why or f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
