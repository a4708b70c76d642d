"""Exact-generation check on a GPU: vLLM + dms_fp8 against the dense DMS reference.

For each prompt: greedy-generate with ``vllm.LLM(..., kv_cache_dtype="dms_fp8")`` (one request at
a time, engine in-process), read the request's arena rows before they are released, and compare
with ``vllm_dms.tools.reference.reference_forward`` on the same tokens (teacher-forced, K/V through
FP8 for decode rows, as the engine reads them): greedy tokens, flags (recovered from the arena), live counts per (layer, head), and the
log-probabilities vLLM returned. Writes one JSON row per model.

Two checks per prompt: *free-running* (the reference computes its own decisions: numerics and
decisions together) and *mechanics* (the reference is given the engine's decisions, recovered
from the arena: store, eviction and attention alone). By default the reference runs on the
engine's own weights (``vllm_dms.tools.reference_view``), so synthetic dummy-weight checkpoints work.

    python benchmarks/correctness.py --model DIR --name smollm2-135m-dms --out results.json

--chunk N runs the prompts with chunked prefill at a token budget of N; --one-shot NAME then
compares tokens and live counts with the row NAME already in --out (the one-shot run).
--prompt-tokens N takes N-token windows of held-out Gutenberg text as prompts. --gap explains
each free-running live-count mismatch: the reference is re-run given the engine's decisions in
fp32 and in bf16, and a differing decision is near the threshold when bf16 rounding alone moves
its logit at least as far as its distance to 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time

import torch

PROMPT_FILE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "prompts.json")


def arena_rows(layout, kv_layers, slot):
    """(live [L, H], pages [L, H], positions of each row's live tokens [L][H]) for one slot."""
    from vllm_dms.worker.kernels.arena_ops import arena_read_row, arena_state
    live, pages, positions = [], [], []
    for kv in kv_layers:
        st = arena_state(kv.view(-1), layout)
        live.append(st.row_len[slot].cpu())
        pages.append(st.row_npages[slot].cpu())
        positions.append([arena_read_row(kv.view(-1), layout, slot, h)["pos"]
                          for h in range(layout.num_kv_heads)])
    return torch.stack(live), torch.stack(pages), positions


def flags_from_positions(positions, n_tokens, window):
    """Recover f[k] for k < n_tokens - 1 - window (older than the window): present <=> unflagged."""
    L, H = len(positions), len(positions[0])
    cutoff = n_tokens - 1 - window
    flags = torch.ones(L, max(cutoff, 0), H, dtype=torch.bool)
    for l in range(L):
        for h in range(H):
            pos = positions[l][h]
            old = pos[pos < cutoff]
            flags[l, old, h] = False
    return flags


def injected_from_flags(fl: torch.Tensor, n_tokens: int, shift: int) -> torch.Tensor:
    """Arena flags [L, cutoff, H] -> decisions [L, n_tokens, H] (d[k + shift] = f[k]). Decisions
    of the last W + 1 keys stay False: no query of this sequence reads their flags yet."""
    L, cutoff, H = fl.shape
    dec = torch.zeros(L, n_tokens, H, dtype=torch.bool)
    dec[:, shift: shift + cutoff] = fl
    return dec


def max_logprob_diff(vllm_logprobs, ref_logits, upto: int) -> float:
    logp = torch.log_softmax(ref_logits.float(), -1).cpu()
    worst = 0.0
    for t, lp in enumerate(vllm_logprobs[:upto]):
        for tid, v in lp.items():
            worst = max(worst, abs(v.logprob - float(logp[t, tid])))
    return worst


def engine_runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def engine_model(llm):
    m = engine_runner(llm).get_model()
    return m.unwrap() if hasattr(m, "unwrap") else m


def load_prompts(tok, max_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Token ids: the fixture prompts, or windows of held-out text (lcet10; alice29 calibrates)."""
    if not prompt_tokens:
        texts = json.load(open(PROMPT_FILE))["prompts"][:max_prompts]
        return [tok(t)["input_ids"] for t in texts]
    from vllm_dms.tools.texts import gutenberg_text
    ids = tok(gutenberg_text("lcet10.txt"))["input_ids"]
    assert len(ids) >= max_prompts * prompt_tokens, "not enough held-out text"
    return [ids[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(max_prompts)]


MARGIN_BINS = {"<=1": 1.0, "1-2": 2.0, "2-4": 4.0, "4-8": 8.0, ">8": float("inf")}


def gap_analysis(l32, l16, engine_flags, mismatch_rows, pre32=None, pre16=None):
    """Per prompt: lane logits [L, cutoff, H] of the reference given the engine's decisions in
    fp32 / bf16, the engine's flags, and the (layer, head) rows whose live counts differ in the
    free-running check. A row is explained when some engine decision at its layer or below
    differs from the fp32 reference and every such decision is near the threshold (bf16 moves
    that key's logit across 0); by lane reach when every such |fp32 logit| is within the
    largest bf16 move of its (layer, head) lane over the prompt. pre32 / pre16: the lanes before
    q_norm (Qwen3), judged against 0: where the rest of a borrowed head is zero (the synthetic
    checkpoints) q_norm maps the lane to +-sqrt(D), so the logit hides how near a decision is
    and the threshold sits at ~0 before the norm."""
    rows = dict(rows_mismatched=0, rows_explained=0, rows_without_cause=0, decisions_differing=0,
                decisions_near_threshold=0, decisions_within_2x=0, decisions_judged=0,
                near_threshold_all=0, examples=[], farthest=[],
                margin_histogram={k: 0 for k in MARGIN_BINS}, decisions_within_lane_reach=0,
                rows_explained_lane_reach=0, decisions_near_prenorm=0,
                rows_explained_prenorm=0)
    pre = list(zip(pre32, pre16)) if pre32 is not None else [None] * len(l32)
    for p, (a, b, fl, bad, pp) in enumerate(zip(l32, l16, engine_flags, mismatch_rows, pre)):
        differ = (a > 0) != fl
        margin = a.abs() / (a - b).abs().clamp_min(1e-30)  # <= 1: bf16 alone reaches 0
        near = differ & (margin <= 1)
        # a lane whose bf16 logit moved by R at some key of this prompt can flip a decision of
        # |fp32| <= R at another key: the lane's own reach, where one key's recompute is luckier
        reach = (a - b).abs().amax(dim=1, keepdim=True)  # [L, 1, H]
        in_reach = differ & (a.abs() <= reach)
        rows["decisions_within_lane_reach"] += int(in_reach.sum())
        mpre = margin if pp is None else pp[0].abs() / (pp[0] - pp[1]).abs().clamp_min(1e-30)
        near_pre = differ & (mpre <= 1)
        rows["decisions_near_prenorm"] += int(near_pre.sum())
        rows["decisions_differing"] += int(differ.sum())
        rows["decisions_near_threshold"] += int(near.sum())
        rows["decisions_within_2x"] += int((differ & (margin <= 2)).sum())
        lo = -1.0  # differing decisions by margin: how far beyond bf16 reach the tail goes
        for k, hi in MARGIN_BINS.items():
            rows["margin_histogram"][k] += int((differ & (margin > lo) & (margin <= hi)).sum())
            lo = hi
        rows["decisions_judged"] += differ.numel()  # base rate: how many are near at all
        rows["near_threshold_all"] += int((margin <= 1).sum())
        where = differ.nonzero().tolist()  # row-major, as margin[differ]

        def decision(i, **extra):
            l, k, h = where[i]
            return dict(prompt=p, layer=l, key=k, head=h, logit_fp32=float(a[l, k, h]),
                        logit_bf16=float(b[l, k, h]), lane_reach=float(reach[l, 0, h]),
                        margin_prenorm=float(mpre[l, k, h]), **extra)
        rows["examples"] += [decision(i) for i in range(min(12 - len(rows["examples"]),
                                                            len(where)))]
        # the differing decisions farthest from bf16 reach (margin = |fp32| / |fp32 - bf16|)
        far = margin[differ].topk(min(3, len(where)))
        rows["farthest"] += [decision(int(i), margin=float(m))
                             for m, i in zip(far.values, far.indices, strict=True)]
        for l, h in bad:
            rows["rows_mismatched"] += 1
            cause = differ[: l + 1]
            if not bool(cause.any()):
                rows["rows_without_cause"] += 1
            else:
                rows["rows_explained"] += bool((near[: l + 1] == cause).all())
                rows["rows_explained_lane_reach"] += bool((in_reach[: l + 1] == cause).all())
                rows["rows_explained_prenorm"] += bool((near_pre[: l + 1] == cause).all())
    rows["farthest"] = sorted(rows["farthest"], key=lambda e: -e["margin"])[:5]
    rows["explained_fraction"] = rows["rows_explained"] / max(rows["rows_mismatched"], 1)
    for k in ("lane_reach", "prenorm"):
        rows[f"explained_fraction_{k}"] = rows[f"rows_explained_{k}"] / max(rows["rows_mismatched"], 1)
    rows["near_threshold_base_rate"] = rows["near_threshold_all"] / max(rows["decisions_judged"], 1)
    return rows


def run(model_dir: str, name: str, steps: int, max_prompts: int, eager: bool,
        weights: str = "engine", chunk: int = 0, prompt_tokens: int = 0, compile_: bool = True,
        gap: bool = False, gpu_util: float = 0.35, kv_bytes: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_dms.engine.config import DMSConfig
    from vllm_dms.tools.reference import reference_forward
    from vllm_dms.worker.runtime import inprocess_engine

    dms = DMSConfig.from_checkpoint(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(tok, max_prompts, prompt_tokens)
    synthetic = "dms_synthetic" in json.load(open(os.path.join(model_dir, "config.json")))
    max_len = max(4096, max(len(p) for p in prompts) + steps + 64)
    extra = {} if compile_ or eager else dict(
        compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})
    llm = LLM(model_dir, kv_cache_dtype="dms_fp8", max_model_len=max_len, max_num_seqs=8,
              gpu_memory_utilization=gpu_util, enforce_eager=eager, seed=0,
              # a named KV size skips vLLM's memory profile, which other GPU jobs would upset
              **(dict(kv_cache_memory_bytes=kv_bytes) if kv_bytes else {}),
              load_format="dummy" if synthetic else "auto", enable_prefix_caching=False,
              enable_chunked_prefill=bool(chunk),
              **(dict(max_num_batched_tokens=chunk) if chunk else {}), **extra)
    if weights == "engine":
        from vllm_dms.tools.reference_view import reference_view
        hf = reference_view(engine_model(llm), llm.llm_engine.vllm_config.model_config.hf_config)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    sp = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, logprobs=5)
    rows = dict(match=0, total=0, dec_eq=0, dec_n=0, live_eq=0, live_n=0, lp_diff=0.0,
                m_match=0, m_live_eq=0, m_lp_diff=0.0)
    flagged, judged = torch.zeros(dms.num_layers), 0  # per-layer eviction on the prompts' text
    per_prompt, gap_in = [], ([], [], [], [], [], [])
    for ids in prompts:
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0].outputs[0]
        mgr, rt = inprocess_engine(llm)
        slot = mgr.link.release[-1]
        kv_layers = [kv for kv in _kv_layers(llm)]
        live, pages, positions = arena_rows(rt.layout, kv_layers, slot)
        seq = ids + list(out.token_ids)
        with torch.no_grad():
            ref = reference_forward(hf, dms, torch.tensor(seq[:-1], device="cuda"),
                                    kv_fp8=True)
        P = len(ids)
        ref_tok = ref.logits[P - 1:].argmax(-1).cpu()
        gen = torch.tensor(out.token_ids)
        first_div = int((ref_tok != gen).nonzero()[0]) if bool((ref_tok != gen).any()) else steps
        rows["match"] += int((ref_tok == gen).sum()); rows["total"] += steps
        n_arena = len(seq) - 1
        ref_live = ref.live[:, n_arena - 1].cpu()
        rows["live_eq"] += int((ref_live == live).sum()); rows["live_n"] += live.numel()
        fl = flags_from_positions(positions, n_arena, dms.window)
        ref_fl = ref.flags[:, : fl.shape[1]].cpu()
        rows["dec_eq"] += int((ref_fl == fl).sum()); rows["dec_n"] += fl.numel()
        rows["lp_diff"] = max(rows["lp_diff"],
                              max_logprob_diff(out.logprobs, ref.logits[P - 1:], first_div))
        # mechanics: the engine's own decisions injected, teacher-forced on its tokens
        flagged += fl.float().sum(dim=(1, 2))
        judged += fl.shape[1] * fl.shape[2]
        inj = injected_from_flags(fl, n_arena, dms.decision_shift)
        with torch.no_grad():
            ref_m = reference_forward(hf, dms, torch.tensor(seq[:-1], device="cuda"),
                                      kv_fp8=True, injected_decisions=inj)
        rows["m_match"] += int((ref_m.logits[P - 1:].argmax(-1).cpu() == gen).sum())
        rows["m_live_eq"] += int((ref_m.live[:, n_arena - 1].cpu() == live).sum())
        rows["m_lp_diff"] = max(rows["m_lp_diff"],
                                max_logprob_diff(out.logprobs, ref_m.logits[P - 1:], steps))
        if gap:  # the reference's own logits given the engine's history, fp32 and bf16
            with torch.no_grad():
                ref_16 = reference_forward(hf, dms, torch.tensor(seq[:-1], device="cuda"),
                                           kv_fp8=True, injected_decisions=inj,
                                           dtype=torch.bfloat16)
            s, c = dms.decision_shift, fl.shape[1]
            gap_in[0].append(ref_m.lane_logits[:, s:s + c].cpu())
            gap_in[1].append(ref_16.lane_logits[:, s:s + c].cpu())
            gap_in[2].append(fl)
            gap_in[3].append((ref_live != live).nonzero().tolist())
            gap_in[4].append(ref_m.lane_pre[:, s:s + c].cpu())
            gap_in[5].append(ref_16.lane_pre[:, s:s + c].cpu())
        bytes_dms = int(pages.sum()) * rt.layout.subpage_bytes
        bytes_bf16 = n_arena * dms.num_layers * dms.num_kv_heads * dms.head_dim * 2 * 2
        per_prompt.append(dict(prompt_tokens=P, first_divergence=first_div,
                               live_mean=float(live.float().mean()), kv_bytes_dms=bytes_dms,
                               kv_bytes_bf16=bytes_bf16, tokens=list(out.token_ids),
                               live=live.tolist()))
        print(f"{name}: prompt {P} tok, first divergence {first_div}/{steps}, live mean "
              f"{live.float().mean():.1f} of {n_arena}, live==ref {bool((ref_live == live).all())}",
              flush=True)
    return dict(model=name, prompts=len(prompts), steps=steps,
                greedy_token_match=rows["match"] / rows["total"],
                decision_match=rows["dec_eq"] / max(rows["dec_n"], 1),
                live_count_match=rows["live_eq"] / rows["live_n"],
                max_abs_logit_diff=rows["lp_diff"],
                max_abs_logit_diff_note="max |logprob(vLLM) - logprob(reference)| over the top-5 "
                                        "returned per step, up to the first greedy divergence",
                mechanics_token_match=rows["m_match"] / rows["total"],
                mechanics_live_count_match=rows["m_live_eq"] / rows["live_n"],
                mechanics_max_abs_logprob_diff=rows["m_lp_diff"],
                mechanics_note="reference given the engine's decisions (from the arena), "
                               "teacher-forced on the engine's tokens, all steps",
                weights=weights, model_runner=type(engine_runner(llm)).__module__,
                chunk_tokens=chunk or None, prefix_caching=False,
                live_count_gap=gap_analysis(*gap_in) if gap else None,
                eviction_rate_per_layer=[round(float(x), 4) for x in flagged / max(judged, 1)],
                eviction_rate_note="fraction of keys older than the window that the engine "
                                   "evicted (recovered from the arena), per layer",
                kv_bytes_per_seq_dms=sum(p["kv_bytes_dms"] for p in per_prompt) // len(per_prompt),
                kv_bytes_per_seq_bf16=sum(p["kv_bytes_bf16"] for p in per_prompt) // len(per_prompt),
                per_prompt=per_prompt, cuda_graphs=not eager)


def _kv_layers(llm):
    eng = llm.llm_engine.engine_core.engine_core
    runner = eng.model_executor.driver_worker.worker.model_runner
    ctx = runner.vllm_config.compilation_config.static_forward_context
    rt_names = sorted(ctx, key=lambda n: int(n.split(".layers.")[1].split(".")[0]))
    return [ctx[n].kv_cache for n in rt_names if hasattr(ctx[n], "kv_cache")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--chunk", type=int, default=0,
                    help="--enable-chunked-prefill with this max_num_batched_tokens (0: off)")
    ap.add_argument("--weights", choices=["engine", "hf"], default="engine",
                    help="reference weights: the engine's own tensors, or the HF checkpoint")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="prompts of this many tokens of held-out text (0: tests/fixtures)")
    ap.add_argument("--no-compile", action="store_true",
                    help="with --graphs: decode CUDA graphs without torch.compile (faster start)")
    ap.add_argument("--gap", action="store_true", help="explain live-count mismatches")
    ap.add_argument("--one-shot", default="",
                    help="compare tokens / live counts with this row (by name) of --out")
    ap.add_argument("--gpu-util", type=float, default=0.35)
    ap.add_argument("--kv-bytes", type=int, default=0, help="KV memory (0: vLLM's profile)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # arena readable in-process
    t0 = time.time()
    row = run(a.model, a.name, a.steps, a.prompts, eager=not a.graphs, weights=a.weights,
              chunk=a.chunk, prompt_tokens=a.prompt_tokens, compile_=not a.no_compile,
              gap=a.gap, gpu_util=a.gpu_util, kv_bytes=a.kv_bytes)
    row.update(commit=_commit(), date=datetime.date.today().isoformat(),
               device=torch.cuda.get_device_name(), vllm_version=_vllm_version(),
               wall_s=round(time.time() - t0, 1))
    rows = json.load(open(a.out)) if os.path.exists(a.out) else []
    if a.one_shot:
        row.update(vs_one_shot(row, next(r for r in rows if r["model"] == a.one_shot)))
    rows.append(row)
    json.dump(rows, open(a.out, "w"), indent=1)
    print(json.dumps({k: v for k, v in row.items() if k != "per_prompt"}, indent=1))


def vs_one_shot(row: dict, base: dict) -> dict:
    """Greedy tokens and final live counts [L, H] of each prompt against the one-shot row."""
    pairs = list(zip(row["per_prompt"], base["per_prompt"]))
    assert [p["prompt_tokens"] for p, _ in pairs] == [b["prompt_tokens"] for _, b in pairs]
    tok = [sum(x == y for x, y in zip(p["tokens"], b["tokens"])) / len(b["tokens"])
           for p, b in pairs]
    live = [float((torch.tensor(p["live"]) == torch.tensor(b["live"])).float().mean())
            for p, b in pairs]
    return dict(one_shot_row=base["model"], token_match_vs_one_shot=sum(tok) / len(tok),
                tokens_identical_vs_one_shot=all(t == 1.0 for t in tok),
                live_match_vs_one_shot=sum(live) / len(live),
                live_identical_vs_one_shot=all(x == 1.0 for x in live))


def _commit() -> str:
    # The device machine's checkout may carry a stale .git: the caller's hash wins.
    if os.environ.get("VLLM_DMS_COMMIT"):
        return os.environ["VLLM_DMS_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def _vllm_version() -> str:
    import vllm
    return vllm.__version__


if __name__ == "__main__":
    main()
