"""DMS quality harness: held-out Gutenberg text (alice29.txt, never trained on), teacher-forced.

For each window of N tokens the DMS checkpoint runs twice through the exact dense reference
(vllm_dms.tools.reference): eviction on, and eviction off (borrowed lane still zeroed). Scored per
position t < N-1 (predicting token t+1):
  kld_vs_noevict  mean KL(no-evict || DMS) in nats/token
  token_match     fraction of positions whose argmax agrees
  ppl / ppl_noevict / ppl_base   exp(mean NLL); base = the plain HF model without DMS fields
  measured_compression  N / mean live keys after the last query (over layers, KV heads, windows);
                  per-layer values use the mean over heads and windows
Greedy generation agreement: 4 prompts x 64 tokens, DMS vs no-evict, exact DMS semantics (an
incremental decoder that tests check against reference.greedy_generate_reference).

Path dms_fp8 (GPU): the same windows through vLLM with --kv-cache-dtype dms_fp8 (prompt_logprobs,
vllm_dms.tools.quality_vllm). vLLM returns only its top-k, so its KLDs are on the support "top-k
ids + one tail bucket" (row field kld_support; a lower bound of the full KLD): kld_vs_noevict
against the no-evict reference, kld_vs_reference_evict against the exact reference with eviction on
(agreement of engine and reference). measured_compression: the engine arena's live counts when
readable (in-process engine), else the evict reference's on the same windows (details say which).
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
from vllm_dms.tools.quality_vllm import (TOP_K, VllmScores, kl_topk, score_vllm, summarize, topk_of,
                                         window_stats)
from vllm_dms.tools.reference import (_apply_rope, _linear, _mlp, _rms_norm, _rope_cos_sin,
                                      _zero_lane, fp8_roundtrip, lane_decisions, project_qkv,
                                      reference_forward)

EVAL_TEXT = "alice29.txt"
ROW_KEYS = ("model", "path", "cr_target", "measured_compression", "kld_vs_noevict", "token_match",
            "tokens_scored", "ppl", "ppl_base", "commit", "date")
DMS_FP8_KEYS = ("kld_vs_reference_evict", "kld_support")  # top-level only in dms_fp8 rows


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
def score_reference(model, dms: DMSConfig, windows: torch.Tensor, kv_fp8: bool = False) -> dict:
    """DMS (evict) vs no-evict through the exact reference, over windows [n, T]."""
    tot = dict(n=0, kld=0.0, match=0, nll=0.0, nll_ref=0.0)
    live, rates = [], []
    for ids in windows:
        ev = reference_forward(model, dms, ids, evict=True, kv_fp8=kv_fp8)
        ne = reference_forward(model, dms, ids, evict=False, kv_fp8=kv_fp8)
        for k, v in logit_stats(ev.logits, ne.logits, ids).items():
            tot[k] += v
        live.append(ev.live[:, -1])
        rates.append(ev.decisions.float().mean())
    comp, per_layer = compression(torch.stack(live), windows.shape[1])
    n = tot["n"]
    return dict(tokens_scored=n, kld_vs_noevict=tot["kld"] / n, token_match=tot["match"] / n,
                ppl=_nan_exp(tot["nll"] / n), ppl_noevict=_nan_exp(tot["nll_ref"] / n),
                measured_compression=comp, compression_per_layer=per_layer,
                decision_rate=float(torch.stack(rates).mean()))


@torch.no_grad()
def base_ppl(base_model, windows: torch.Tensor) -> float:
    """Perplexity of the plain HF model (its own forward, no DMS) on the same positions."""
    nll, n = 0.0, 0
    dev = base_model.lm_head.weight.device
    for ids in windows:
        logits = base_model(input_ids=ids[None].to(dev)).logits[0, :-1].float()
        lp = F.log_softmax(logits, -1)
        nll += float(-lp.gather(1, ids[1:].to(dev).view(-1, 1)).sum())
        n += logits.shape[0]
    return _nan_exp(nll / n)


# ------------------------------------------------------------------ greedy generation
@torch.no_grad()
def greedy_cached(model, dms: DMSConfig, prompt: torch.Tensor, steps: int, *,
                  evict: bool = True, kv_fp8: bool = False) -> torch.Tensor:
    """Greedy decode with a per-layer K/V cache under the reference's visibility rule.

    Same semantics as reference.greedy_generate_reference (one token at a time: at query t a
    key k is visible iff t-k <= W or its flag d[k+shift] is 0; the newest key's flag is 0),
    but O(T) per token instead of a full re-run.
    """
    dev = model.lm_head.weight.device
    seq = prompt.reshape(-1).tolist()
    total = len(seq) + steps
    cos, sin = _rope_cos_sin(model, total, dev)
    L, G, D = dms.num_layers, dms.group, dms.head_dim
    ks, vs, decs = ([[] for _ in range(L)] for _ in range(3))
    out = []
    for t in range(total - 1):
        h = model.model.embed_tokens.weight[seq[t]].float().view(1, -1)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            q, k, v = project_qkv(_rms_norm(h, layer.input_layernorm), attn, dms)
            decs[i].append(lane_decisions(q, dms)[0])
            q = _apply_rope(_zero_lane(q, dms), cos[t:t + 1], sin[t:t + 1])
            k = _apply_rope(k, cos[t:t + 1], sin[t:t + 1])
            if dms.zero_lane_after_rope:
                q = _zero_lane(q, dms)
            if kv_fp8:
                k, v = fp8_roundtrip(k), fp8_roundtrip(v)
            ks[i].append(k[0])
            vs[i].append(v[0])
            K, V = torch.stack(ks[i]), torch.stack(vs[i])  # [t+1, H, D]
            d = torch.stack(decs[i])  # [t+1, H]
            flags = d.clone() if dms.decision_shift == 0 else torch.cat(
                [d[1:], torch.zeros_like(d[:1])])
            dist = (t - torch.arange(t + 1, device=dev)).view(-1, 1)
            vis = (dist <= dms.window) | ~flags if evict else torch.ones_like(flags)
            s = torch.einsum("hd,khd->hk", q[0], K.repeat_interleave(G, 1)) * D ** -0.5
            s = s.masked_fill(~vis.t().repeat_interleave(G, 0), float("-inf"))
            o = torch.einsum("hk,khd->hd", torch.softmax(s, -1), V.repeat_interleave(G, 1))
            h = h + _linear(o.reshape(1, -1), attn.o_proj)
            h = h + _mlp(_rms_norm(h, layer.post_attention_layernorm), layer.mlp)
        if t >= len(seq) - 1:  # past the prompt: the argmax is the next token
            nxt = int(_linear(_rms_norm(h, model.model.norm), model.lm_head).argmax())
            seq.append(nxt)
            out.append(nxt)
    return torch.tensor(out[:steps], dtype=torch.long)


def generation_agreement(model, dms: DMSConfig, prompts: list[torch.Tensor], steps: int) -> dict:
    """Greedy DMS vs no-evict: mean position-wise agreement and mean common-prefix fraction."""
    agree, prefix = [], []
    for p in prompts:
        a = greedy_cached(model, dms, p, steps, evict=True)
        b = greedy_cached(model, dms, p, steps, evict=False)
        same = (a == b).tolist()
        agree.append(sum(same) / steps)
        prefix.append((same.index(False) if False in same else steps) / steps)
    return dict(gen_agreement=sum(agree) / len(agree), gen_prefix_match=sum(prefix) / len(prefix),
                gen_prompts=len(prompts), gen_tokens=steps)


# ------------------------------------------------------------------ the vLLM path (GPU)
def _add(tot: dict, part: dict) -> None:
    for k, v in part.items():
        tot[k] = tot.get(k, 0) + v


@torch.no_grad()
def score_dms_fp8(model, dms: DMSConfig, windows: torch.Tensor, vs: VllmScores,
                  top_k: int = TOP_K) -> dict:
    """vLLM's dms_fp8 logprobs (vs, from score_vllm on these windows) against the exact
    reference: no-evict and evict runs, without FP8 K/V (a prefill attends its bf16 K/V)."""
    tot, ref, live = {}, {}, []
    for ids, wl in zip(windows, vs.windows):
        ev = reference_forward(model, dms, ids, evict=True)
        ne = reference_forward(model, dms, ids, evict=False)
        _add(tot, window_stats(wl, ne.logits, ev.logits))
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
    scores.update(_compression_fields(vs, ref_live, windows.shape[1]))
    return scores


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
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_row(model_name: str, path: str, dms: DMSConfig, scores: dict, ppl_base_value: float,
             date: str, extra: dict) -> dict:
    """ROW_KEYS (plus DMS_FP8_KEYS for a dms_fp8 row), the rest of scores and extra in details."""
    row = dict(model=model_name, path=path, cr_target=dms.target_cr,
               measured_compression=scores["measured_compression"],
               kld_vs_noevict=scores["kld_vs_noevict"], token_match=scores["token_match"],
               tokens_scored=scores["tokens_scored"], ppl=scores["ppl"], ppl_base=ppl_base_value,
               commit=git_commit(), date=date)
    if path == "dms_fp8":
        row.update((k, scores[k]) for k in DMS_FP8_KEYS)
    details = {k: v for k, v in scores.items() if k not in row}
    details.update(extra)
    row["details"] = details
    return row


def merge_rows(path: str, rows: list[dict]) -> list[dict]:
    """Append rows to the JSON list at path, replacing rows with the same (model, path)."""
    old = []
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    keys = {(r["model"], r["path"]) for r in rows}
    merged = [r for r in old if (r["model"], r["path"]) not in keys] + rows
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
    return merged


def _load(model_dir: str, device: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def evaluate(model_dir: str, *, base_dir: str, name: str, path: str = "reference",
             windows: int = 4, window_len: int = 1024, gen_prompts: int = 4, gen_tokens: int = 64,
             gen_prompt_len: int = 128, device: str = "cpu", kv_fp8: bool = False,
             top_k: int = TOP_K, engine_kw: dict | None = None, date: str | None = None) -> dict:
    """One row of `path` ("reference" or "dms_fp8") for model_dir (a DMS checkpoint); base_dir
    gives ppl_base. dms_fp8 needs a GPU (vLLM); its reference runs on `device`."""
    from transformers import AutoTokenizer
    if path == "dms_fp8" and kv_fp8:
        raise ValueError("kv_fp8 with path dms_fp8: the engine's prefill attends bf16 K/V, so "
                         "the reference it is compared with has no FP8 round trip")
    t0 = time.time()
    dms = DMSConfig.from_checkpoint(model_dir)
    tokens = eval_tokens(AutoTokenizer.from_pretrained(model_dir))
    wins = make_windows(tokens, windows, window_len)
    vs = None
    if path == "dms_fp8":  # engine first: it sizes itself from the GPU memory still free
        vs = score_vllm(model_dir, wins, top_k=top_k, **(engine_kw or {}))
        torch.set_float32_matmul_precision("highest")  # an in-process worker may have set TF32
    base = _load(base_dir, device)
    pb = base_ppl(base, wins)
    del base
    model = _load(model_dir, device)
    extra = dict(window=dms.window, decision_shift=dms.decision_shift, eval_text=EVAL_TEXT,
                 eval_windows=windows, eval_window_len=window_len, kv_fp8=kv_fp8,
                 model_dir=model_dir, base_dir=base_dir, device=device)
    if vs is None:
        scores = score_reference(model, dms, wins, kv_fp8=kv_fp8)
        if gen_prompts > 0 and gen_tokens > 0:
            prompts = make_prompts(tokens, gen_prompts, gen_prompt_len)
            extra.update(generation_agreement(model, dms, prompts, gen_tokens))
            extra["gen_prompt_len"] = gen_prompt_len
    else:
        scores = score_dms_fp8(model, dms, wins, vs, top_k)
        extra.update(top_k=top_k, engine=vs.engine)
    extra["wall_s"] = round(time.time() - t0, 1)
    date = date or datetime.date.today().isoformat()
    return make_row(name, path, dms, scores, pb, date, extra)


def main_eval(argv: list[str] | None = None) -> int:
    """`vllm-dms eval MODEL_DIR ...`: score a DMS checkpoint on held-out text, write the row."""
    p = argparse.ArgumentParser(prog="vllm-dms eval", description=main_eval.__doc__)
    p.add_argument("model_dir", help="DMS checkpoint dir, or 'smollm2' (untrained SmolLM2 + "
                   "DMS fields) / 'smollm2-trained' (built from the shipped delta)")
    p.add_argument("--base-dir", default=None, help="plain base checkpoint (default SmolLM2)")
    p.add_argument("--name", default=None, help="row's model name (default: folder name)")
    p.add_argument("--tag", default="smollm2-135m", help="<model> in quality-<model>-<date>.json")
    p.add_argument("--path", choices=("reference", "dms_fp8"), default="reference")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-len", type=int, default=1024)
    p.add_argument("--gen-prompts", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--gen-prompt-len", type=int, default=128)
    p.add_argument("--kv-fp8", action="store_true", help="round-trip K/V through e4m3 "
                   "(reference path only)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="dms_fp8: prompt_logprobs per "
                   "position, the KLD's support (top-k + tail)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="dms_fp8 engine")
    p.add_argument("--enforce-eager", action="store_true", help="dms_fp8 engine: no CUDA graphs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/...)")
    a = p.parse_args(argv)
    if a.path == "dms_fp8" and a.kv_fp8:
        p.error("--kv-fp8 is for --path reference (the engine's prefill attends bf16 K/V)")
    model_dir, name = resolve_model(a.model_dir, a.name)
    from vllm_dms.tools.checkpoints import smollm2_base
    base_dir = a.base_dir or smollm2_base()
    date = datetime.date.today().isoformat()
    engine_kw = dict(gpu_memory_utilization=a.gpu_memory_utilization,
                     enforce_eager=a.enforce_eager)
    row = evaluate(model_dir, base_dir=base_dir, name=name, path=a.path, windows=a.windows,
                   window_len=a.window_len, gen_prompts=a.gen_prompts, gen_tokens=a.gen_tokens,
                   gen_prompt_len=a.gen_prompt_len, device=a.device, kv_fp8=a.kv_fp8,
                   top_k=a.top_k, engine_kw=engine_kw, date=date)
    out = a.out or os.path.join("benchmarks", "results", f"quality-{a.tag}-{date}.json")
    merge_rows(out, [row])
    print(json.dumps(row, indent=2))
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
