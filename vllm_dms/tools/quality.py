"""DMS quality harness: held-out Gutenberg text (alice29.txt, never trained on), teacher-forced.

Windows of each context length (default 1024 and 4096) from the start of the text; every path
sees the same windows. Scored per position t < N-1 (predicting token t+1), against the BASE
model (the plain HF checkpoint through its own forward, fp32: no DMS, borrowed lane not zeroed):
  kld_vs_base     mean KL(base || path) in nats/token
  token_match     fraction of positions whose top-1 equals the base's argmax
  ppl / ppl_base / ppl_noevict   exp(mean NLL) of the path, the base, and the DMS checkpoint
                  without eviction (exact reference, borrowed lane zeroed)
  measured_compression  N / mean live keys after the last query (over layers, KV heads,
                  windows); compression_per_layer in details
Paths: reference (the exact DMS rule, fp32, on --device), dms_fp8 (vLLM with
--kv-cache-dtype dms_fp8), and the floor: vllm-fp8 / vllm-bf16 (the base through vLLM with its
own --kv-cache-dtype fp8 / auto). vLLM returns only its top-k, so the vLLM paths' KLDs are on
the support "top-k ids + one tail bucket" (kld_support; a lower bound of the full KLD). dms_fp8
rows also carry kld_vs_reference_evict (engine against the exact reference with eviction) and
measured_compression from the engine arena's live counts when readable (in-process engine).
Greedy generation agreement (reference path, --gen-prompts): DMS vs no-evict, exact semantics.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time

import torch
import torch.nn.functional as F

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.quality_vllm import (TOP_K, VllmScores, kl_topk, kld_support, kld_vs_reference,
                                         open_engine, score_vllm, summarize, token_matches,
                                         topk_of, window_stats)
from vllm_dms.tools.greedy import generation_agreement, greedy_cached  # noqa: F401
from vllm_dms.tools.reference import reference_forward

EVAL_TEXT = "alice29.txt"
ROW_KEYS = ("model", "path", "context", "cr_target", "measured_compression", "kld_vs_base",
            "token_match", "ppl", "ppl_base", "ppl_noevict", "tokens_scored", "commit", "date",
            "device")
DMS_FP8_KEYS = ("kld_vs_reference_evict", "kld_support")  # top-level only in dms_fp8 rows
FLOOR_PATHS = {"vllm-fp8": "fp8", "vllm-bf16": "auto"}  # the base through vLLM's own KV dtypes
PATHS = ("reference", "dms_fp8") + tuple(FLOOR_PATHS)
CONTEXTS = (1024, 4096)


# ------------------------------------------------------------------ data
def eval_tokens(tokenizer, text: str = EVAL_TEXT) -> torch.Tensor:
    from vllm_dms.tools.texts import gutenberg_text
    return torch.tensor(tokenizer(gutenberg_text(text), add_special_tokens=False)["input_ids"])


def make_windows(tokens: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n consecutive non-overlapping windows [n, length] from the start of the text."""
    if tokens.numel() < n * length:
        raise ValueError(f"text has {tokens.numel()} tokens, need {n} x {length}")
    return tokens[: n * length].view(n, length).clone()


def make_prompts(tokens: torch.Tensor, n: int, length: int) -> list[torch.Tensor]:
    """n prompts of `length` tokens starting at evenly spaced points of the text."""
    step = (tokens.numel() - length) // n
    return [tokens[(i + 1) * step - step // 2:][:length].clone() for i in range(n)]


# ------------------------------------------------------------------ metrics
def logit_stats(dms_logits: torch.Tensor, ref_logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """Sums over positions 0..T-2 (each predicts the next token) for one window."""
    lp = F.log_softmax(dms_logits[:-1].float(), -1)
    lr = F.log_softmax(ref_logits[:-1].float(), -1)
    nxt = ids[1:].to(lp.device).view(-1, 1)
    return dict(n=lp.shape[0], kld=float((lr.exp() * (lr - lp)).sum(-1).sum()),
                match=int((lp.argmax(-1) == lr.argmax(-1)).sum()),
                nll=float(-lp.gather(1, nxt).sum()), nll_ref=float(-lr.gather(1, nxt).sum()))


def compression(live_last: torch.Tensor, seq_len: int) -> tuple[float, list[float]]:
    """live_last [W, L, H]: live keys after the last query -> (overall, per-layer) T / mean live."""
    per_layer = live_last.float().mean(dim=(0, 2))
    return seq_len / float(per_layer.mean()), [seq_len / float(x) for x in per_layer]


def _nan_exp(x: float) -> float:
    return float(torch.tensor(x).exp())


@torch.no_grad()
def base_logits(base_model, ids: torch.Tensor) -> torch.Tensor:
    """The plain HF model's own forward (no DMS, lane not zeroed) of one window [T] -> [T, V]."""
    dev = base_model.lm_head.weight.device
    return base_model(input_ids=ids[None].to(dev), use_cache=False).logits[0].float()


@torch.no_grad()
def score_reference(model, dms: DMSConfig, windows: torch.Tensor, kv_fp8: bool = False,
                    base_model=None) -> dict:
    """DMS (evict) vs no-evict through the exact reference, over windows [n, T]; with base_model
    also against the base (kld_vs_base, token_match and ppl_base; else token_match is vs
    no-evict)."""
    tot = dict(n=0, kld=0.0, match=0, nll=0.0, nll_ref=0.0)
    vb = dict(kld=0.0, match=0, nll_ref=0.0)
    live, rates = [], []
    for ids in windows:
        ev = reference_forward(model, dms, ids, evict=True, kv_fp8=kv_fp8)
        ne = reference_forward(model, dms, ids, evict=False, kv_fp8=kv_fp8)
        for k, v in logit_stats(ev.logits, ne.logits, ids).items():
            tot[k] += v
        if base_model is not None:
            st = logit_stats(ev.logits, base_logits(base_model, ids).to(ev.logits.device), ids)
            _add(vb, dict(kld=st["kld"], match=st["match"], nll_ref=st["nll_ref"]))
        live.append(ev.live[:, -1])
        rates.append(ev.decisions.float().mean())
    comp, per_layer = compression(torch.stack(live), windows.shape[1])
    n = tot["n"]
    out = dict(tokens_scored=n, kld_vs_noevict=tot["kld"] / n, token_match=tot["match"] / n,
               ppl=_nan_exp(tot["nll"] / n), ppl_noevict=_nan_exp(tot["nll_ref"] / n),
               measured_compression=comp, compression_per_layer=per_layer,
               decision_rate=float(torch.stack(rates).mean()))
    if base_model is not None:
        out.update(kld_vs_base=vb["kld"] / n, token_match_vs_noevict=tot["match"] / n,
                   token_match=vb["match"] / n, ppl_base=_nan_exp(vb["nll_ref"] / n))
    return out


@torch.no_grad()
def base_ppl(base_model, windows: torch.Tensor) -> float:
    """Perplexity of the plain HF model (its own forward, no DMS) on the same positions."""
    nll, n = 0.0, 0
    for ids in windows:
        lp = F.log_softmax(base_logits(base_model, ids)[:-1], -1)
        nll += float(-lp.gather(1, ids[1:].to(lp.device).view(-1, 1)).sum())
        n += lp.shape[0]
    return _nan_exp(nll / n)


# ------------------------------------------------------------------ the vLLM path (GPU)
def _add(tot: dict, part: dict) -> None:
    for k, v in part.items():
        tot[k] = tot.get(k, 0) + v


@torch.no_grad()
def score_dms_fp8(model, dms: DMSConfig, windows: torch.Tensor, vs: VllmScores,
                  top_k: int = TOP_K, base_model=None) -> dict:
    """vLLM's dms_fp8 logprobs (vs, from score_vllm on these windows) against the exact
    reference (no-evict and evict runs, every K/V on the FP8 grid as the engine reads it) and,
    with base_model, against the base (kld_vs_base, token_match)."""
    tot, ref, live, vb = {}, {}, [], dict(kld=0.0, match=0)
    for ids, wl in zip(windows, vs.windows):
        ev = reference_forward(model, dms, ids, evict=True, kv_fp8=True)
        ne = reference_forward(model, dms, ids, evict=False, kv_fp8=True)
        _add(tot, window_stats(wl, ne.logits, ev.logits))
        if base_model is not None:
            bl = base_logits(base_model, ids).to(ev.logits.device)
            _add(vb, dict(kld=kld_vs_reference(wl, bl), match=token_matches(wl, bl)))
        # the reference's own KLD, full and through the same top-k lens: the lens's bias
        full = logit_stats(ev.logits, ne.logits, ids)
        lens = float(kl_topk(ne.logits[:-1], *topk_of(ev.logits[:-1], top_k)).sum())
        _add(ref, dict(kld=full["kld"], kld_topk=lens, match=full["match"], nll=full["nll"],
                       nll_ne=full["nll_ref"]))
        live.append(ev.live[:, -1].cpu())
    scores = summarize(tot, top_k)
    n, ref_live = tot["n"], torch.stack(live)
    scores.update(reference_kld_vs_noevict=ref["kld"] / n,
                  reference_kld_vs_noevict_topk=ref["kld_topk"] / n,
                  reference_token_match=ref["match"] / n, reference_ppl=_nan_exp(ref["nll"] / n),
                  ppl_noevict=_nan_exp(ref["nll_ne"] / n),
                  reference_compression=compression(ref_live, windows.shape[1])[0])
    if base_model is not None:
        scores.update(kld_vs_base=vb["kld"] / n, token_match_vs_noevict=scores["token_match"],
                      token_match=vb["match"] / n)
    scores.update(_compression_fields(vs, ref_live, windows.shape[1]))
    return scores


@torch.no_grad()
def score_floor(windows: torch.Tensor, vs: VllmScores, base_model, top_k: int = TOP_K) -> dict:
    """The base through vLLM's own KV dtype (vs) against the base's fp32 forward."""
    tot = dict(n=0, nll=0.0, kld=0.0, match=0)
    for ids, wl in zip(windows, vs.windows):
        bl = base_logits(base_model, ids)
        _add(tot, dict(n=wl.actual.numel(), nll=float(-wl.actual.sum()),
                       kld=kld_vs_reference(wl, bl), match=token_matches(wl, bl)))
    n = tot["n"]
    return dict(tokens_scored=n, kld_vs_base=tot["kld"] / n, token_match=tot["match"] / n,
                ppl=_nan_exp(tot["nll"] / n), measured_compression=1.0,
                kld_support=kld_support(top_k))


def _compression_fields(vs: VllmScores, ref_live: torch.Tensor, T: int) -> dict:
    """measured_compression from the engine's arena if it was read, else the reference's."""
    if vs.live is None:
        comp, per_layer = compression(ref_live, T)
        return dict(measured_compression=comp, compression_per_layer=per_layer,
                    measured_compression_source="reference_evict (same windows); "
                    + vs.live_note)
    comp, per_layer = compression(vs.live, T)
    return dict(measured_compression=comp, compression_per_layer=per_layer,
                measured_compression_source="engine_arena",
                engine_live_match=float((vs.live == ref_live).float().mean()))


# ------------------------------------------------------------------ rows and the CLI
def git_commit() -> str:
    """$VLLM_DMS_COMMIT when set (GPU sessions: the device's git may not know the tree's HEAD)."""
    if os.environ.get("VLLM_DMS_COMMIT"):
        return os.environ["VLLM_DMS_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_row(model_name: str, path: str, dms: DMSConfig | None, context: int, scores: dict,
             ppl_base_value: float, date: str, extra: dict, device: str = "cpu") -> dict:
    """ROW_KEYS (plus DMS_FP8_KEYS for dms_fp8, kld_support for the floor), the rest of scores
    and extra in details."""
    row = dict(model=model_name, path=path, context=context,
               cr_target=None if dms is None else dms.target_cr,
               measured_compression=scores["measured_compression"],
               kld_vs_base=scores.get("kld_vs_base"), token_match=scores["token_match"],
               ppl=scores["ppl"], ppl_base=ppl_base_value, ppl_noevict=scores.get("ppl_noevict"),
               tokens_scored=scores["tokens_scored"], commit=git_commit(), date=date,
               device=device)
    if path == "dms_fp8":
        row.update((k, scores[k]) for k in DMS_FP8_KEYS)
    elif path in FLOOR_PATHS:
        row["kld_support"] = scores["kld_support"]
    details = {k: v for k, v in scores.items() if k not in row}
    details.update(extra)
    row["details"] = details
    return row


def merge_rows(path: str, rows: list[dict], fields=("model", "path", "context")) -> list[dict]:
    """Append rows to the JSON list at path, replacing rows with the same values of fields."""
    old = []
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    key = lambda r: tuple(r.get(k) for k in fields)  # noqa: E731
    keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in keys] + rows
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
    return merged


def _load(model_dir: str, device: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def device_name(path: str, device: str) -> str:
    if (path != "reference" or device.startswith("cuda")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def _vllm_scores(path, model_dir, base_dir, wins_by_ctx, top_k, engine_kw) -> dict:
    """One engine (dms_fp8 on model_dir, or the floor's KV dtype on base_dir) for every context."""
    target = model_dir if path == "dms_fp8" else base_dir
    kv = "dms_fp8" if path == "dms_fp8" else FLOOR_PATHS[path]
    engine = open_engine(target, max(wins_by_ctx), top_k, kv, **(engine_kw or {}))
    out = {c: score_vllm(target, w, top_k=top_k, kv_cache_dtype=kv, engine=engine)
           for c, w in wins_by_ctx.items()}
    del engine
    torch.set_float32_matmul_precision("highest")  # an in-process worker may have set TF32
    return out


def evaluate(model_dir: str, *, base_dir: str, name: str, path: str = "reference",
             windows: int = 4, contexts=CONTEXTS, gen_prompts: int = 0, gen_tokens: int = 64,
             gen_prompt_len: int = 128, device: str = "cpu", kv_fp8: bool = False,
             top_k: int = TOP_K, engine_kw: dict | None = None, date: str | None = None
             ) -> list[dict]:
    """One row per context of `path` (PATHS) for model_dir (a DMS checkpoint) against base_dir
    (the plain model). The vLLM paths need a GPU; the references run on `device`."""
    from transformers import AutoTokenizer
    if path != "reference" and kv_fp8:
        raise ValueError("kv_fp8 with a vLLM path: the FP8 round trip is the engine's own "
                         "(vLLM's fp8 cache, or dms_fp8 against an FP8 reference)")
    if path not in PATHS:
        raise ValueError(f"path {path!r}: want one of {PATHS}")
    t0 = time.time()
    tokens = eval_tokens(AutoTokenizer.from_pretrained(model_dir))
    wins_by_ctx = {int(c): make_windows(tokens, windows, int(c)) for c in contexts}
    vs_by_ctx = {}
    if path != "reference":  # engine first: it sizes itself from the GPU memory still free
        vs_by_ctx = _vllm_scores(path, model_dir, base_dir, wins_by_ctx, top_k, engine_kw)
    base = _load(base_dir, device)
    dms = DMSConfig.from_checkpoint(model_dir) if path in ("reference", "dms_fp8") else None
    model = _load(model_dir, device) if dms is not None else None
    date = date or datetime.date.today().isoformat()
    rows = []
    for ctx, wins in wins_by_ctx.items():
        t1 = time.time()
        extra = dict(eval_text=EVAL_TEXT, eval_windows=windows, kv_fp8=kv_fp8,
                     model_dir=model_dir, base_dir=base_dir, torch_device=device)
        if dms is not None:
            extra.update(window=dms.window, decision_shift=dms.decision_shift)
        if path == "reference":
            scores = score_reference(model, dms, wins, kv_fp8=kv_fp8, base_model=base)
            if gen_prompts > 0 and gen_tokens > 0:
                prompts = make_prompts(tokens, gen_prompts, gen_prompt_len)
                extra.update(generation_agreement(model, dms, prompts, gen_tokens))
                extra["gen_prompt_len"] = gen_prompt_len
        elif path == "dms_fp8":
            scores = score_dms_fp8(model, dms, wins, vs_by_ctx[ctx], top_k, base_model=base)
        else:
            scores = score_floor(wins, vs_by_ctx[ctx], base, top_k)
        if path != "reference":
            extra.update(top_k=top_k, engine=vs_by_ctx[ctx].engine)
        pb = scores.pop("ppl_base", None) or base_ppl(base, wins)
        extra.update(wall_s=round(time.time() - t1, 1), total_wall_s=round(time.time() - t0, 1))
        rows.append(make_row(name, path, dms, ctx, scores, pb, date, extra,
                             device_name(path, device)))
    return rows


def main_eval(argv: list[str] | None = None) -> int:
    """`vllm-dms eval MODEL_DIR ...`: score a DMS checkpoint on held-out text, write the rows."""
    p = argparse.ArgumentParser(prog="vllm-dms eval", description=main_eval.__doc__)
    p.add_argument("model_dir", help="DMS checkpoint dir, or 'smollm2' (untrained SmolLM2 + "
                   "DMS fields) / 'smollm2-trained' (built from the shipped delta)")
    p.add_argument("--base-dir", default=None, help="plain base checkpoint (default SmolLM2)")
    p.add_argument("--name", default=None, help="row's model name (default: folder name)")
    p.add_argument("--tag", default="smollm2-135m", help="<model> in quality-<model>-<date>.json")
    p.add_argument("--path", choices=PATHS, default="reference")
    p.add_argument("--windows", type=int, default=4, help="windows per context")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--window-len", type=int, default=None, help="one context (old spelling)")
    p.add_argument("--gen-prompts", type=int, default=0)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--gen-prompt-len", type=int, default=128)
    p.add_argument("--kv-fp8", action="store_true", help="round-trip K/V through e4m3 "
                   "(reference path only)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="vLLM paths: prompt_logprobs per "
                   "position, the KLD's support (top-k + tail)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM engine")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM engine: no CUDA graphs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/...)")
    a = p.parse_args(argv)
    if a.path != "reference" and a.kv_fp8:
        p.error("--kv-fp8 is for --path reference (a vLLM path's K/V are FP8 by its dtype)")
    model_dir, name = resolve_model(a.model_dir, a.name)
    from vllm_dms.tools.checkpoints import smollm2_base
    base_dir = a.base_dir or smollm2_base()
    date = datetime.date.today().isoformat()
    engine_kw = dict(gpu_memory_utilization=a.gpu_memory_utilization,
                     enforce_eager=a.enforce_eager)
    rows = evaluate(model_dir, base_dir=base_dir, name=name, path=a.path, windows=a.windows,
                    contexts=[a.window_len] if a.window_len else a.contexts,
                    gen_prompts=a.gen_prompts, gen_tokens=a.gen_tokens,
                    gen_prompt_len=a.gen_prompt_len, device=a.device, kv_fp8=a.kv_fp8,
                    top_k=a.top_k, engine_kw=engine_kw, date=date)
    out = a.out or os.path.join("benchmarks", "results", f"quality-{a.tag}-{date}.json")
    merge_rows(out, rows)
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "details"}))
    print(f"wrote {out}")
    return 0


def resolve_model(spec: str, name: str | None) -> tuple[str, str]:
    """'smollm2' / 'smollm2-trained' shorthands, else a folder; -> (dir, row name)."""
    if spec == "smollm2":
        from vllm_dms.tools.checkpoints import smollm2_dms
        return smollm2_dms(window=16), name or "smollm2-135m-dms-untrained-w16"
    if spec == "smollm2-trained":
        from vllm_dms.tools.training.delta import shipped_checkpoint
        return shipped_checkpoint(), name or "smollm2-135m-dms-trained-cr8-w16"
    return spec, name or os.path.basename(os.path.abspath(spec))
