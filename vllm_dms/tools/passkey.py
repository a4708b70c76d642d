"""Passkey retrieval: a 5-digit number planted at a depth of a long Gutenberg text, asked for at
the end, through the model's chat template. Accuracy with eviction against without.

Each prompt is exactly `length` tokens: chat prefix + instruction, filler (held-out alice29.txt
from a seeded offset) with the needle spliced in at token depth*filler, then the question, the
assistant header and the answer's first words (so a small model only has to say the number).
Paths: dms_fp8 (vllm.LLM on the GPU; "noevict" is the same checkpoint served with
--kv-cache-dtype auto, which vllm_dms runs without eviction; "base" the plain model), and
reference (the exact DMS rule, greedy, on the CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import random
import re

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"
HAY = "<<HAYSTACK>>"
LENGTHS = (2048, 3072, 4096, 5120, 6144, 7168)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
HAYSTACK_TEXT = "alice29.txt"


@dataclasses.dataclass
class Case:
    length: int
    depth: float
    key: str
    ids: list[int]
    needle_at: int  # index of the needle's first token in ids


def template_parts(tok) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack in the chat-formatted prompt."""
    msgs = [{"role": "user", "content": INTRO + HAY + QUESTION}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    before, after = text.split(HAY)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before), enc(after + ANSWER_PREFIX)


def build_case(tok, hay: list[int], length: int, depth: float, key: str, offset: int,
               parts=None) -> Case:
    """One prompt of exactly `length` tokens with the needle at `depth` of the filler."""
    before, after = parts or template_parts(tok)
    needle = tok(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    n = length - len(before) - len(needle) - len(after)
    if n <= 0 or offset + n > len(hay):
        raise ValueError(f"length {length}: {n} filler tokens from offset {offset} of {len(hay)}")
    filler = hay[offset:offset + n]
    cut = round(depth * n)
    ids = before + filler[:cut] + needle + filler[cut:] + after
    return Case(length, depth, key, ids, len(before) + cut)


def make_cases(tok, hay: list[int], lengths=LENGTHS, depths=DEPTHS, seeds: int = 2) -> list[Case]:
    """lengths x depths x seeds cases; the key and the filler's offset come from the seed."""
    parts = template_parts(tok)
    cases = []
    for s in range(seeds):
        for length in lengths:
            rng = random.Random(1000 * s + length)
            for depth in depths:
                key = str(rng.randint(10000, 99999))
                offset = rng.randint(0, max(0, len(hay) - length))
                cases.append(build_case(tok, hay, length, depth, key, offset, parts))
    return cases


def parse_answer(text: str) -> str | None:
    """The first run of digits in the model's answer (digits may be space-separated tokens)."""
    m = re.search(r"\d(?:[\d ,]*\d)?", text)
    return None if m is None else re.sub(r"[ ,]", "", m.group(0))


def score(cases: list[Case], answers: list[str]) -> dict:
    """Accuracy overall, per length and per depth, plus every case's answer."""
    ok = [parse_answer(a) == c.key for c, a in zip(cases, answers, strict=True)]

    def acc(pred) -> dict:
        groups: dict = {}
        for c, o in zip(cases, ok):
            groups.setdefault(pred(c), []).append(o)
        return {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}
    return dict(accuracy=sum(ok) / max(1, len(ok)), n=len(ok),
                by_length=acc(lambda c: c.length), by_depth=acc(lambda c: c.depth),
                cases=[dict(length=c.length, depth=c.depth, key=c.key, answer=a, ok=o)
                       for c, a, o in zip(cases, answers, ok)])


# ------------------------------------------------------------------ runners
def run_vllm(model_dir: str, cases: list[Case], kv_cache_dtype: str, max_tokens: int = 12,
             **engine_kw) -> list[str]:
    """Greedy answers from vllm.LLM (GPU); stops at the end-of-turn token."""
    from vllm import LLM, SamplingParams
    kw = dict(max_model_len=max(c.length for c in cases) + max_tokens,
              gpu_memory_utilization=0.3, seed=0, enable_prefix_caching=False)
    kw.update(engine_kw, kv_cache_dtype=kv_cache_dtype)
    llm = LLM(model_dir, **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": c.ids} for c in cases], sp, use_tqdm=False)
    del llm
    return [o.outputs[0].text for o in outs]


def run_reference(model, dms, tok, cases: list[Case], evict: bool, max_tokens: int = 12
                  ) -> list[str]:
    """Greedy answers under the exact DMS rule (vllm_dms.tools.quality.greedy_cached)."""
    import torch

    from vllm_dms.tools.greedy import greedy_cached
    out = []
    for c in cases:
        gen = greedy_cached(model, dms, torch.tensor(c.ids), max_tokens, evict=evict)
        out.append(tok.decode(gen.tolist(), skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> int:
    """`vllm-dms passkey MODEL_DIR`: passkey accuracy with eviction vs without."""
    p = argparse.ArgumentParser(prog="vllm-dms passkey", description=main.__doc__)
    p.add_argument("model_dir", help="DMS checkpoint dir")
    p.add_argument("--path", choices=("dms_fp8", "reference"), default="dms_fp8")
    p.add_argument("--base-dir", default=None, help="also run this plain model (dms_fp8 path)")
    p.add_argument("--name", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="cpu", help="reference path")
    p.add_argument("--modes", nargs="+", choices=("evict", "noevict", "base"), default=None,
                   help="default: evict noevict (+ base with --base-dir); one vLLM engine each, "
                   "so run one mode per process when GPU memory is tight")
    p.add_argument("--out", required=True, help="JSON file (list of rows, one per mode)")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_dms.tools.quality import git_commit
    from vllm_dms.tools.texts import gutenberg_text
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    hay = tok(gutenberg_text(HAYSTACK_TEXT), add_special_tokens=False)["input_ids"]
    cases = make_cases(tok, hay, a.lengths, a.depths, a.seeds)
    name = a.name or os.path.basename(os.path.abspath(a.model_dir))
    common = dict(model=name, path=a.path, commit=git_commit(),
                  date=datetime.date.today().isoformat(), device=_device(a.path, a.device))
    rows = []
    if a.path == "dms_fp8":
        ekw = dict(gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.enforce_eager)
        runs = [("evict", a.model_dir, "dms_fp8"), ("noevict", a.model_dir, "auto")]
        runs += [("base", a.base_dir, "auto")] if a.base_dir else []
        for mode, d, kv in (r for r in runs if a.modes is None or r[0] in a.modes):
            answers = run_vllm(d, cases, kv, a.max_tokens, **ekw)
            rows.append(dict(common, mode=mode, kv_cache_dtype=kv, **score(cases, answers)))
            _print(rows[-1])
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from vllm_dms.engine.config import DMSConfig
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
        model = model.to(a.device).eval()
        dms = DMSConfig.from_checkpoint(a.model_dir)
        for mode, evict in (m for m in (("evict", True), ("noevict", False))
                            if a.modes is None or m[0] in a.modes):
            answers = run_reference(model, dms, tok, cases, evict, a.max_tokens)
            rows.append(dict(common, mode=mode, **score(cases, answers)))
            _print(rows[-1])
    merge_rows(a.out, rows)
    print(f"wrote {a.out}")
    return 0


def merge_rows(path: str, rows: list[dict]) -> list[dict]:
    """Add rows to the JSON list at path, replacing rows with the same (model, path, mode)."""
    from vllm_dms.tools.quality import merge_rows as merge
    return merge(path, rows, fields=("model", "path", "mode"))


def _device(path: str, device: str) -> str:
    import torch
    if (path == "dms_fp8" or device.startswith("cuda")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def _print(row: dict) -> None:
    print(f"{row['model']} {row['path']} {row['mode']}: accuracy {row['accuracy']:.3f} "
          f"(n={row['n']}) by length {row['by_length']} by depth {row['by_depth']}")


if __name__ == "__main__":
    raise SystemExit(main())
